"""The payload tree ``/agent-server``, built in a chroot of the builder rootfs and cached
per ``recipe.tree_digest``: python and its stdlib, the venv with the agent server (uv),
a private tmux, the ELF closure (``bundle``), precompiled and with normalised modes."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from imagefarm.errors import PayloadError
from imagefarm.settings import Settings
from . import bundle, userns
from .builder import Chroot, Log, builder_rootfs, find_uv, quiet
from .cache import payload_dir
from .mirror import builder_mirror
from .recipe import Recipe

_UV_CACHE_INSIDE = "/var/cache/imagefarm-uv"
_COMPLETE = ".imagefarm-complete"
#: terminfo entries the private tmux may need (bases without ncurses-base have none)
_TERMINFO = ("d/dumb", "l/linux", "s/screen", "s/screen-256color", "t/tmux", "t/tmux-256color",
             "v/vt100", "x/xterm", "x/xterm-256color")
#: imported by the isolation check (all native stdlib modules the server touches), then
#: the recipe's ``check_import`` (the server)
_CHECK_IMPORTS = ["ssl", "sqlite3", "ctypes", "lzma", "bz2", "zlib", "hashlib", "uuid", "decimal",
                  "_asyncio", "pyexpat"]
#: the builder's C.UTF-8 locale: tmux refuses to start without a UTF-8 locale, and a base
#: without libc has none (the launcher points LOCPATH here only on such a base)
_LOCALE = "usr/lib/locale/C.utf8"


def tree_size(tree: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(tree):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def build_tree(settings: Settings, recipe: Recipe, *, log: Log = quiet, force: bool = False,
               mirror: str | None = None) -> tuple[Path, str]:
    """The installed, bundled tree of ``recipe`` (cached per ``recipe.tree_digest``).

    ``mirror`` overrides the recipe's Debian mirror (default: the machine's apt sources)."""
    trees = payload_dir(settings) / "trees"
    final = trees / recipe.tree_digest.split(":", 1)[1][:24]
    if not force and (final / _COMPLETE).exists():
        return final / "tree", (final / _COMPLETE).read_text().strip()
    spec = recipe.builder.model_copy(update={"mirror": builder_mirror(recipe.builder.mirror, mirror)})
    root = builder_rootfs(Path(settings.cache_dir), spec, log)
    if os.geteuid() != 0:  # a normal user: the same steps as root of a user namespace
        if not Path(recipe.source).is_file():
            raise PayloadError(f"recipe {recipe.name} has no file to rebuild it from in a user namespace")
        return userns.build_tree(Path(settings.cache_dir), recipe.source, spec.mirror or "", force=force, log=log,
                                 version=recipe.agent_server_version)
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
            if recipe.payload.bash:
                _add_bash(ch, tree)
            closure = bundle.collect_syslib(ch, tree, prefix, log)
            exes = [tree / "bin" / f"python{recipe.builder.python}"]
            if recipe.payload.tmux:
                exes.append(tree / "tools/bin/tmux")
            if recipe.payload.bash:
                exes.append(tree / "tools/bin/bash")
            bundle.patch_elves(ch, tree, prefix, exes, log, before=closure)
            ch.run([f"{prefix}/venv/bin/python", "-I", "-c", "import sys; print(sys.version)"],
                   what="the patched python")
            if recipe.payload.precompile:
                _precompile(ch, tree, recipe, log)
            log("checking the bundled python loads nothing from outside the payload ...")
            bundle.check_isolated(ch, prefix, f"{prefix}/venv/bin/python",
                                  [*_CHECK_IMPORTS, recipe.agent_server.check_import])
            if recipe.payload.tmux:
                ch.run([f"{prefix}/tools/bin/tmux", "-V"], what="bundled tmux -V")
            if recipe.payload.bash:
                ch.run([f"{prefix}/tools/bin/bash", "-c", "echo $BASH_VERSION"], what="bundled bash")
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


def _add_bash(ch: Chroot, tree: Path) -> None:
    """The builder's bash and C.UTF-8 locale, for bases that have neither (no libc at all)."""
    (tree / "tools/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(ch.root / "usr/bin/bash", tree / "tools/bin/bash")
    if not (ch.root / _LOCALE).is_dir():
        raise PayloadError(f"the builder has no /{_LOCALE} (libc-bin): tmux needs a UTF-8 locale")
    shutil.copytree(ch.root / _LOCALE, tree / "tools/locale/C.utf8", symlinks=False)


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
