"""The payload built without root: a user namespace in place of root.

Two steps need privileges in a root build, and both have an unprivileged twin:

* the builder rootfs: ``mmdebstrap --mode=unshare`` (Debian's; it maps the user to
  root and the user's subordinate ids to the rest with newuidmap) instead of
  ``debootstrap``;
* the chroot session (mount ``/proc``, bind ``/dev`` and the output tree, chroot):
  the tree build re-runs itself (``python -m imagefarm.payload.userns``) under
  ``unshare --user --map-root-user --mount --pid --fork``, where it is uid 0 of a
  namespace it owns, with a private mount table. The same ``builder.Chroot`` code
  runs there; only ``/dev`` is bound recursively (a user namespace may not bind a
  mount without its locked children).

What lands in the layer does not depend on which way it was built: the tree is
copied from the same Debian packages and written with fixed owners, modes and mtimes,
so a root and an unprivileged build of one recipe give the same digest (measured:
recipes/README.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from imagefarm.errors import PayloadError
from imagefarm.host.containers import which

Log = Callable[[str], None]

#: the namespace the tree build re-runs in: uid 0 of its own, private mounts and pids
UNSHARE = ("--user", "--map-root-user", "--mount", "--pid", "--fork", "--kill-child")


def in_user_namespace() -> bool:
    """True inside a user namespace that maps only part of the id space (not the host's)."""
    try:
        first = Path("/proc/self/uid_map").read_text().split("\n", 1)[0].split()
    except OSError:
        return False
    return first != ["0", "0", "4294967295"]


def mmdebstrap_rootfs(suite: str, target: Path, mirror: str, packages: list[str]) -> None:
    """A minbase rootfs of ``suite`` in ``target``, owned by the user.

    mmdebstrap's own namespace maps its root to the first subordinate id, so a
    directory it writes is owned by ids the user cannot change. Its tar stream is
    unpacked instead, as the user: every file the user's own, which is what the build
    namespace (the user mapped to root) needs. Device nodes are left out (``/dev`` is
    bound from the host at build time)."""
    mm = subprocess.Popen([which("mmdebstrap"), "--mode=unshare", "--variant=minbase", "--quiet",
                           f"--include={','.join(packages)}", suite, "-", mirror],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tar = subprocess.run([which("tar"), "-x", "-p", "-C", str(target), "--exclude=./dev/*"],
                         stdin=mm.stdout, capture_output=True, timeout=1800)
    assert mm.stdout is not None and mm.stderr is not None
    mm.stdout.close()
    err = mm.stderr.read().decode(errors="replace")
    if mm.wait() != 0 or tar.returncode != 0:
        tail = "\n".join((err + tar.stderr.decode(errors="replace")).strip().splitlines()[-15:])
        hint = (" (mmdebstrap --mode=unshare needs subuid/subgid ranges and newuidmap: `imagefarm doctor`)"
                if "newuidmap" in err or "subuid" in err else "")
        raise PayloadError(f"mmdebstrap of Debian {suite} from {mirror} failed (exit {mm.returncode}, "
                           f"tar {tar.returncode}){hint}; check the mirror is reachable:\n{tail}")


def build_tree(cache_dir: Path, recipe_source: str, mirror: str, *, force: bool, log: Log,
               version: str) -> tuple[Path, str]:
    """Run ``payload.build_tree`` in a user namespace (the recipe file at ``version``);
    its (tree, python version)."""
    argv = [which("unshare"), *UNSHARE, "--", sys.executable, "-m", "imagefarm.payload.userns",
            str(cache_dir), recipe_source, mirror, "1" if force else "0", version]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = None
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("@@result "):
            result = json.loads(line[len("@@result "):])
        else:
            log(line.rstrip("\n"))
    err = proc.stderr.read() if proc.stderr else ""
    if proc.wait() != 0 or result is None:
        tail = "\n".join(err.strip().splitlines()[-15:])
        if "Operation not permitted" in err and "unshare" in err:
            raise PayloadError("cannot create a user namespace (unshare --user failed): "
                               "unprivileged user namespaces are disabled on this machine; "
                               "`imagefarm doctor` says how to enable them, or fetch the payload "
                               f"from a registry (--payload-from):\n{tail}")
        raise PayloadError(f"the unprivileged tree build failed (exit {proc.returncode}):\n{tail}")
    return Path(result["tree"]), result["python_version"]


def _main(argv: list[str]) -> int:
    """Inside the namespace: build the tree as its root, print lines, then the result."""
    from imagefarm.settings import Settings

    from .tree import build_tree as tree_build
    from .recipe import load_recipe

    cache_dir, source, mirror, force, version = argv
    recipe = load_recipe(source, Path(source).parent).at_version(version)
    settings = Settings(cache_dir=Path(cache_dir))
    try:
        tree, version = tree_build(settings, recipe, log=lambda m: print(m, flush=True),
                                   force=force == "1", mirror=mirror)
    except PayloadError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print("@@result " + json.dumps({"tree": str(tree), "python_version": version}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
