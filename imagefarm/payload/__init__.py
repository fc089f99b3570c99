"""The agent-server payload: one reproducible layer that runs on any x86_64 base.

``build_payload(settings, recipe)`` returns the ``Payload`` for a recipe, building it
only when ``cache_dir/payload/<recipe digest>.json`` (and its blob) is missing:

1. a Debian builder rootfs (``builder.builder_rootfs``, cached);
2. in a chroot of it, the tree ``/agent-server``: the builder's python3.X and its
   stdlib, a venv (``home = /agent-server/bin``) with openhands-agent-server
   installed by uv, a private tmux under ``tools/bin``, all precompiled
   (unchecked-hash .pyc) -- cached per ``recipe.tree_digest``;
3. the ELF closure (glibc and its loader included) into ``/agent-server/syslib``
   and patchelf (``bundle``), so nothing comes from the base's libc;
4. the launcher ``/usr/local/bin/openhands-agent-server`` (a Python script whose
   shebang is the venv's python: no /bin/sh needed) and the layer, written by
   ``oci.write_layer`` with fixed mtimes and owners: same recipe, same bytes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefarm import oci
from imagefarm.errors import PayloadError
from .recipe import Recipe
from imagefarm.settings import Settings
from . import bundle
from .builder import Chroot, builder_rootfs, file_lock, find_uv

Log = Callable[[str], None]

__all__ = ["Payload", "build_payload", "load_payload", "launcher_script", "payload_dir"]

_UV_CACHE_INSIDE = "/var/cache/imagefarm-uv"
_COMPLETE = ".imagefarm-complete"
#: terminfo entries the private tmux may need (bases without ncurses-base have none)
_TERMINFO = ("d/dumb", "l/linux", "s/screen", "s/screen-256color", "t/tmux", "t/tmux-256color",
             "v/vt100", "x/xterm", "x/xterm-256color")
#: imported by the isolation check (all native stdlib modules the server touches + the server)
_CHECK_IMPORTS = ["ssl", "sqlite3", "ctypes", "lzma", "bz2", "zlib", "hashlib", "uuid", "decimal",
                  "_asyncio", "pyexpat", "openhands.agent_server.api"]


def _quiet(_msg: str) -> None:
    pass


@dataclass(frozen=True, slots=True)
class Payload:
    """A built payload layer and what it was built from."""

    recipe_name: str
    recipe_digest: str
    agent_server_version: str
    layer: oci.Layer
    uncompressed_size: int = 0
    python_version: str = ""
    build_seconds: float = 0.0

    @property
    def digest(self) -> str:
        return self.layer.digest

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe_name": self.recipe_name,
            "recipe_digest": self.recipe_digest,
            "agent_server_version": self.agent_server_version,
            "layer": self.layer.to_json(),
            "uncompressed_size": self.uncompressed_size,
            "python_version": self.python_version,
            "build_seconds": round(self.build_seconds, 1),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Payload":
        return cls(d["recipe_name"], d["recipe_digest"], d["agent_server_version"],
                   oci.Layer.from_json(d["layer"]), int(d.get("uncompressed_size", 0)),
                   d.get("python_version", ""), float(d.get("build_seconds", 0.0)))


def payload_dir(settings: Settings) -> Path:
    return Path(settings.cache_dir) / "payload"


def _record(settings: Settings, recipe: Recipe) -> Path:
    return payload_dir(settings) / (recipe.digest.split(":", 1)[1] + ".json")


def load_payload(settings: Settings, recipe: Recipe) -> Payload | None:
    """The cached payload of ``recipe`` or None (no record, or its blob is gone)."""
    rec = _record(settings, recipe)
    try:
        payload = Payload.from_json(json.loads(rec.read_text()))
    except (OSError, ValueError, KeyError):
        return None
    try:
        if payload.layer.path.stat().st_size != payload.layer.size:
            return None
    except OSError:
        return None
    if payload.recipe_digest != recipe.digest:
        return None
    return payload


#: errno values that mean "the disk is full" (or the file-size limit was hit)
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _mount_point(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists():
        p = p.parent
    while not os.path.ismount(p):
        p = p.parent
    return p


@contextlib.contextmanager
def disk_errors(where: Path, doing: str):
    """Turn "no space left" while ``doing`` into a ``PayloadError`` naming the disk.

    Whatever was half-written is removed by the writers themselves (temporary names,
    renamed only when complete), so the cache is left as it was before.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        mount = _mount_point(where)
        try:
            free = f"{shutil.disk_usage(mount).free / 1e6:.0f} MB free"
        except OSError:
            free = "free space unknown"
        raise PayloadError(
            f"{exc.strerror or 'no space left on device'} while {doing} under {where} "
            f"(disk mounted at {mount}, {free}; the payload needs about 1 GB for its tree and "
            f"layer): free space there or set IMAGEFARM_CACHE_DIR to a bigger disk") from None


def build_payload(settings: Settings, recipe: Recipe, *, log: Log = _quiet, force: bool = False) -> Payload:
    """The payload of ``recipe``: from the cache, else built (minutes on a cold cache)."""
    if recipe.kind != "append":
        raise PayloadError(f"recipe {recipe.name!r} is kind {recipe.kind!r}: only 'append' recipes have a payload layer")
    if not force and (hit := load_payload(settings, recipe)):
        return hit
    pdir = payload_dir(settings)
    with disk_errors(pdir, "building the payload"), file_lock(pdir / ".lock"):
        if not force and (hit := load_payload(settings, recipe)):
            return hit
        t0 = time.monotonic()
        tree, python_version = build_tree(settings, recipe, log=log, force=force)
        log(f"writing the layer (gzip) for recipe {recipe.name} ...")
        layer = oci.write_layer(layer_entries(tree, recipe), pdir / "blobs")
        payload = Payload(recipe.name, recipe.digest, recipe.agent_server_version, layer,
                          _tree_size(tree), python_version, round(time.monotonic() - t0, 1))
        rec = _record(settings, recipe)
        tmp = rec.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload.to_json(), indent=2, sort_keys=True) + "\n")
        tmp.replace(rec)
        log(f"payload {layer.digest[:19]} ({layer.size / 1e6:.0f} MB) in {payload.build_seconds:.0f}s")
        return payload


# -- the tree ---------------------------------------------------------------------

def _tree_size(tree: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(tree):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def build_tree(settings: Settings, recipe: Recipe, *, log: Log = _quiet, force: bool = False) -> tuple[Path, str]:
    """The installed, bundled tree of ``recipe`` (cached per ``recipe.tree_digest``)."""
    trees = payload_dir(settings) / "trees"
    final = trees / recipe.tree_digest.split(":", 1)[1][:24]
    if not force and (final / _COMPLETE).exists():
        return final / "tree", (final / _COMPLETE).read_text().strip()
    root = builder_rootfs(Path(settings.cache_dir), recipe.builder, log)
    uv = find_uv()
    trees.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=trees, prefix=".tmp-"))
    tree = work / "tree"
    tree.mkdir(mode=0o755)
    prefix = recipe.payload.prefix
    try:
        binds = {prefix: tree, _UV_CACHE_INSIDE: Path(settings.cache_dir) / "uv"}
        with Chroot(root, binds, log) as ch:
            python_version = _install(ch, tree, recipe, uv, log)
            if recipe.payload.tmux:
                _add_tmux(ch, tree)
            bundle.collect_syslib(ch, tree, prefix, log)
            exes = [tree / "bin" / f"python{recipe.builder.python}"]
            if recipe.payload.tmux:
                exes.append(tree / "tools/bin/tmux")
            bundle.patch_elves(ch, tree, prefix, exes, log)
            ch.run([f"{prefix}/venv/bin/python", "-I", "-c", "import sys; print(sys.version)"],
                   what="the patched python")
            if recipe.payload.precompile:
                _precompile(ch, tree, recipe, log)
            log("checking the bundled python loads nothing from outside the payload ...")
            bundle.check_isolated(ch, prefix, f"{prefix}/venv/bin/python", _CHECK_IMPORTS)
            if recipe.payload.tmux:
                ch.run([f"{prefix}/tools/bin/tmux", "-V"], what="bundled tmux -V")
        _normalise_modes(tree)
        (work / _COMPLETE).write_text(python_version + "\n")
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
        return final / "tree", python_version
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _install(ch: Chroot, tree: Path, recipe: Recipe, uv_host: str, log: Log) -> str:
    py = f"python{recipe.builder.python}"
    prefix = recipe.payload.prefix
    stdlib = Path(f"usr/lib/{py}")
    if not (ch.root / "usr/bin" / py).exists() or not (ch.root / stdlib).is_dir():
        raise PayloadError(f"the builder ({recipe.builder.suite}) has no /usr/bin/{py}: "
                           f"set builder.python to the suite's python3 version")
    (tree / "bin").mkdir()
    (tree / "lib").mkdir()
    shutil.copy2(ch.root / "usr/bin" / py, tree / "bin" / py)
    os.symlink(py, tree / "bin/python3")
    os.symlink(py, tree / "bin/python")
    drop = set(recipe.payload.drop)

    def ignore(directory: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__"}
        if Path(directory) == ch.root / stdlib:
            skip |= {n for n in names if n in drop or n == "EXTERNALLY-MANAGED"}
        return skip

    shutil.copytree(ch.root / stdlib, tree / "lib" / py, symlinks=True, ignore=ignore)
    got = ch.run([f"{prefix}/bin/{py}", "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                 what="the copied python").stdout.strip()
    ch.run([f"{prefix}/bin/{py}", "-m", "venv", "--without-pip", f"{prefix}/venv"], what="python -m venv")
    cfg = (tree / "venv/pyvenv.cfg").read_text()
    if f"home = {prefix}/bin" not in cfg:
        raise PayloadError(f"venv home is not {prefix}/bin:\n{cfg}")
    # activate scripts are for people; the payload is run by its launcher only
    for name in ("activate", "activate.csh", "activate.fish", "Activate.ps1"):
        (tree / "venv/bin" / name).unlink(missing_ok=True)
    uv = ch.install_host_tool(uv_host)
    argv = [uv, "pip", "install", "--python", f"{prefix}/venv/bin/python", "--native-tls",
            "--no-progress", "--link-mode", "copy", "--cache-dir", _UV_CACHE_INSIDE,
            *([f"--exclude-newer={recipe.agent_server.exclude_newer}"] if recipe.agent_server.exclude_newer else []),
            *recipe.requirements]
    log(f"installing {' '.join(recipe.requirements)} with uv (python {got}) ...")
    t0 = time.monotonic()
    ch.run(argv, what="uv pip install", timeout=3600)
    log(f"installed in {time.monotonic() - t0:.0f}s")
    # Debian's site.py must give the venv's site-packages (not dist-packages)
    code = "import sys, site; print(sys.prefix); print([p for p in sys.path if 'packages' in p])"
    out = ch.run([f"{prefix}/venv/bin/python", "-I", "-c", code], what="sys.path check").stdout
    want = f"{prefix}/venv/lib/{py}/site-packages"
    if f"{prefix}/venv\n" not in out or f"['{want}']" not in out:
        raise PayloadError(f"the venv's sys.path is not just {want}:\n{out}")
    return got


def _add_tmux(ch: Chroot, tree: Path) -> None:
    src = ch.root / "usr/bin/tmux"
    if not src.exists():
        raise PayloadError("recipe wants tmux but the builder has no /usr/bin/tmux: add tmux to builder.packages")
    (tree / "tools/bin").mkdir(parents=True)
    shutil.copy2(src, tree / "tools/bin/tmux")
    for rel in _TERMINFO:
        for d in ("usr/share/terminfo", "lib/terminfo"):
            p = ch.root / d / rel
            if p.exists() or p.is_symlink():
                dst = tree / "tools/terminfo" / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if p.is_symlink():  # resolve inside the chroot, never on the host
                    p = ch.root / ch.run(["readlink", "-f", f"/{d}/{rel}"]).stdout.strip().lstrip("/")
                shutil.copyfile(p, dst)
                break


def _precompile(ch: Chroot, tree: Path, recipe: Recipe, log: Log) -> None:
    """.pyc for everything, hash based and unchecked: reproducible, never recompiled."""
    prefix = recipe.payload.prefix
    py = f"python{recipe.builder.python}"
    for dirpath, dirnames, _files in os.walk(tree):
        if "__pycache__" in dirnames:
            shutil.rmtree(Path(dirpath) / "__pycache__")
            dirnames.remove("__pycache__")
    log("precompiling .pyc (unchecked-hash) ...")
    t0 = time.monotonic()
    _compileall(ch, prefix, py)
    log(f"precompiled in {time.monotonic() - t0:.0f}s")


def _compileall(ch: Chroot, prefix: str, py: str) -> None:
    # workers=1: one process compiles in a stable order (byte-identical output run to
    # run, with PYTHONHASHSEED=0 from the chroot env); files with syntax errors (py2
    # leftovers in some packages) stay uncompiled, as with a normal install
    proc_code = (
        "import compileall, py_compile, sys\n"
        "for d in sys.argv[1:]:\n"
        "    compileall.compile_dir(d, quiet=2, workers=1, optimize=0, force=True,\n"
        "        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)\n"
    )
    # -B: the modules compileall itself imports must not get timestamp .pyc first
    ch.run([f"{prefix}/venv/bin/python", "-I", "-B", "-c", proc_code,
            f"{prefix}/lib/{py}", f"{prefix}/venv/lib/{py}/site-packages"], what="compileall", timeout=3600)


def _normalise_modes(tree: Path) -> None:
    """World-readable (the server may run as any uid); no group/other write."""
    for dirpath, dirnames, files in os.walk(tree):
        for name in dirnames + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if os.path.islink(p):
                continue
            mode = st.st_mode & 0o7777
            new = (mode | 0o444 | (0o111 if mode & 0o100 or os.path.isdir(p) else 0)) & ~0o022 & ~0o7000
            if new != mode:
                os.chmod(p, new)


# -- the layer ----------------------------------------------------------------------

#: an empty directory of the payload: the launcher's working directory while it imports
IMPORT_CWD = "{prefix}/import-cwd"


def launcher_script(recipe: Recipe) -> str:
    """The ``openhands-agent-server`` command: a Python script run by the payload's venv.

    ``-I``: the base's PYTHONPATH/PYTHONHOME never reach the payload's interpreter.
    """
    prefix = recipe.payload.prefix
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", **recipe.payload.launcher_env}
    tools = f"{prefix}/tools/bin" if recipe.payload.tmux else ""
    return f'''#!{prefix}/venv/bin/python -I
# openhands-agent-server {recipe.agent_server_version}: imagefarm recipe {recipe.name} ({recipe.digest[:19]})
# Runs the server from the self-contained tree {prefix}; see recipes/README.md.
import os
import sys

for _key, _value in {env!r}.items():
    os.environ.setdefault(_key, _value)


def _writable(path):
    try:
        return bool(path) and os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)
    except OSError:
        return False


# The server keeps state under HOME and its working directory: when it is started
# as an arbitrary uid (run_as_user 10001 on a root-owned image), give it a private
# writable HOME and, if the working directory is read-only, work there.
if not _writable(os.environ.get("HOME", "")):
    for _tmp in ("/tmp", "/var/tmp", "/dev/shm"):
        if _writable(_tmp):
            _home = os.path.join(_tmp, "openhands-home-%d" % os.getuid())
            os.makedirs(_home, mode=0o700, exist_ok=True)
            os.environ["HOME"] = _home
            break
try:
    _cwd_ok = _writable(os.getcwd())
except OSError:
    _cwd_ok = False
if not _cwd_ok and _writable(os.environ.get("HOME", "")):
    os.chdir(os.environ["HOME"])
# a private tmux (used only when the base has none: it is last on PATH)
if {tools!r} and os.path.isdir({tools!r}):
    os.environ["PATH"] = os.pathsep.join(p for p in (os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"), {tools!r}) if p)
    os.environ.setdefault("TERMINFO_DIRS", "{prefix}/tools/terminfo:")

sys.argv[0] = "openhands-agent-server"
from importlib import import_module

# Some dependencies put the working directory on sys.path when imported (LiteLLM's
# proxy CLI appends os.getcwd()): import from an empty directory of the payload, so a
# module in the base's working tree (/testbed/tornado.py, /testbed/numpy) never
# shadows a dependency the server looks for.
try:
    _here = os.getcwd()
except OSError:
    _here = None
os.chdir({IMPORT_CWD.format(prefix=prefix)!r})
try:
    _main = getattr(import_module({recipe.agent_server.module!r}), {recipe.agent_server.function!r})
finally:
    if _here is not None:
        os.chdir(_here)
sys.exit(_main())
'''


def layer_entries(tree: Path, recipe: Recipe):
    """Tar entries of the payload layer: the tree at PREFIX plus the launcher."""
    prefix = recipe.payload.prefix.strip("/")
    yield oci.dir_entry(prefix)
    yield from oci._walk(tree, prefix)  # noqa: SLF001 - the same reproducible walk as root=
    yield oci.dir_entry(IMPORT_CWD.format(prefix=prefix))
    launcher = recipe.payload.launcher.strip("/")
    parts = launcher.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        yield oci.dir_entry("/".join(parts[:i]))
    yield oci.file_entry(launcher, launcher_script(recipe).encode(), mode=0o755)
