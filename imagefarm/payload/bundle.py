"""Make a tree independent of the base's C library: ELF closure + patchelf.

Every ELF file in the tree is asked (``ldd``, run inside the builder) what it
loads; everything that resolves outside the tree -- libc.so.6, libm, the dynamic
loader itself, libssl, ... -- is copied into ``PREFIX/syslib``. Then:

* executables (python, tmux) get ``PT_INTERP = PREFIX/syslib/ld-linux-x86-64.so.2``
  and ``DT_RPATH = PREFIX/syslib`` (forced RPATH, not RUNPATH: an executable's
  DT_RPATH also applies to the libraries it loads that have no DT_RUNPATH, which
  is what the extension modules of the standard library are);
* shared objects that carry a DT_RUNPATH (wheels' ``$ORIGIN/../foo.libs``) ignore
  the executable's DT_RPATH, so ``PREFIX/syslib`` is appended to their own. patchelf
  writes that as a DT_RUNPATH even where the object had a DT_RPATH, and a DT_RUNPATH is
  not inherited by the libraries the object loads: pillow 11's ``_imaging`` (DT_RPATH
  ``$ORIGIN/../pillow.libs``) then loads its bundled libtiff, which no longer finds the
  ``liblzma-<hash>.so`` beside it. An object that ``ldd`` shows broken that way (a
  library missing after the patch that was found before) gets its DT_RPATH back.

No LD_LIBRARY_PATH anywhere: processes the agent starts (the base's bash and
python) load the base's own libraries with the base's own loader.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

from imagefarm.errors import PayloadError
from .builder import Chroot

Log = Callable[[str], None]

LOADER = "ld-linux-x86-64.so.2"
#: loaded with dlopen by glibc itself (thread cancellation, unwinding): never seen by ldd
DLOPENED = ("libgcc_s.so.1",)
_LIBDIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib", "/lib")

_ARROW = re.compile(r"^\s*(\S+)\s+=>\s+(not found|\S+)(?:\s+\(0x[0-9a-f]+\))?\s*$")
_BARE = re.compile(r"^\s*(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def is_elf(path: Path) -> bool:
    try:
        if path.is_symlink() or not path.is_file():
            return False
        with open(path, "rb") as fh:
            return fh.read(4) == b"\x7fELF"
    except OSError:
        return False


def elf_files(tree: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if is_elf(p):
                out.append(p)
    return out


@dataclass
class Closure:
    libs: dict[str, str] = field(default_factory=dict)          # soname -> path in chroot
    missing: dict[str, list[str]] = field(default_factory=dict)  # file -> sonames not found


def has_dt_rpath(path: Path) -> bool:
    """Whether the ELF file's search path is a DT_RPATH (not a DT_RUNPATH)."""
    try:
        with open(path, "rb") as fh:
            for section in ELFFile(fh).iter_sections():
                if isinstance(section, DynamicSection):
                    tags = {t.entry.d_tag for t in section.iter_tags()}
                    return "DT_RPATH" in tags and "DT_RUNPATH" not in tags
    except (OSError, ELFError):
        return False
    return False


def _inside(tree: Path, prefix: str, p: Path) -> str:
    return prefix.rstrip("/") + "/" + str(p.relative_to(tree))


def ldd_closure(chroot: Chroot, tree: Path, prefix: str, files: list[Path]) -> Closure:
    """The shared libraries ``files`` load from outside ``prefix`` (run in the chroot)."""
    script = 'for f in "$@"; do echo "@@ $f"; ldd "$f" 2>&1 || true; done\n'
    inside = [_inside(tree, prefix, f) for f in files]
    out = chroot.run(["/bin/bash", "-c", script, "ldd-all", *inside], what="ldd").stdout
    closure = Closure()
    current = ""
    for line in out.splitlines():
        if line.startswith("@@ "):
            current = line[3:]
            continue
        m = _ARROW.match(line)
        if m:
            name, path = m.groups()
            if path == "not found":  # "libfoo.so => not found"
                closure.missing.setdefault(current, []).append(name)
            elif not path.startswith(prefix.rstrip("/") + "/"):
                closure.libs.setdefault(name, path)
            continue
        m = _BARE.match(line)
        if m and "/" in m.group(1):
            path = m.group(1)
            if not path.startswith(prefix.rstrip("/") + "/"):
                closure.libs.setdefault(os.path.basename(path), path)
    return closure


def collect_syslib(chroot: Chroot, tree: Path, prefix: str, log: Log) -> Closure:
    """Copy the library closure of every ELF in ``tree`` into ``tree/syslib``."""
    files = elf_files(tree)
    closure = ldd_closure(chroot, tree, prefix, files)
    if LOADER not in closure.libs:
        raise PayloadError(f"no {LOADER} in the library closure of {len(files)} ELF files: is the builder x86_64?")
    for extra in DLOPENED:
        if extra not in closure.libs:
            for d in _LIBDIRS:
                if (chroot.root / d.lstrip("/") / extra).exists():
                    closure.libs[extra] = f"{d}/{extra}"
                    break
    # resolve symlinks inside the chroot (an absolute link must not escape to the host)
    names = sorted(closure.libs)
    real = chroot.run(["readlink", "-f", *(closure.libs[n] for n in names)], what="readlink").stdout.split()
    syslib = tree / "syslib"
    syslib.mkdir(exist_ok=True)
    for name, target in zip(names, real):
        src = chroot.root / target.lstrip("/")
        shutil.copyfile(src, syslib / name)
        os.chmod(syslib / name, 0o755)
    if closure.missing:
        sample = "; ".join(f"{f}: {', '.join(n)}" for f, n in list(closure.missing.items())[:5])
        log(f"warning: {len(closure.missing)} ELF files need libraries the builder lacks ({sample})")
    log(f"bundled {len(names)} system libraries for {len(files)} ELF files into {prefix}/syslib")
    return closure


def patch_elves(chroot: Chroot, tree: Path, prefix: str, executables: list[Path], log: Log,
                before: Closure | None = None) -> None:
    """Point executables at the bundled loader; extend DT_RUNPATHs with syslib.

    ``before``: the closure ``collect_syslib`` found (to tell what the patch broke)."""
    syslib = prefix.rstrip("/") + "/syslib"
    loader = f"{syslib}/{LOADER}"
    for exe in executables:
        inside = _inside(tree, prefix, exe)
        # two calls, rpath first: patchelf 0.18 doing both at once (or the
        # interpreter first) leaves Debian's python3.13 segfaulting at start
        # (measured); the caller runs the result once to prove it
        chroot.run(["patchelf", "--force-rpath", "--set-rpath", syslib, inside], what=f"patchelf --set-rpath {exe.name}")
        chroot.run(["patchelf", "--set-interpreter", loader, inside], what=f"patchelf --set-interpreter {exe.name}")
    exe_set = {e.resolve() for e in executables}
    shared = [f for f in elf_files(tree) if f.resolve() not in exe_set and f.parent != tree / "syslib"]
    if not shared:
        return
    script = 'for f in "$@"; do printf "%s\\t%s\\n" "$f" "$(patchelf --print-rpath "$f" 2>/dev/null)"; done\n'
    inside = [_inside(tree, prefix, f) for f in shared]
    out = chroot.run(["/bin/bash", "-c", script, "rpaths", *inside], what="patchelf --print-rpath").stdout
    todo = []
    for line in out.splitlines():
        path, _, rpath = line.partition("\t")
        if rpath.strip() and syslib not in rpath.split(":"):
            todo.append(path)
    host = {_inside(tree, prefix, f): f for f in shared}
    was_rpath = [p for p in todo if has_dt_rpath(host[p])]
    for i in range(0, len(todo), 50):
        chunk = todo[i:i + 50]
        chroot.run(["/bin/bash", "-c", 'for f in "$@"; do patchelf --add-rpath "$0" "$f" || exit 1; done',
                    syslib, *chunk], what="patchelf --add-rpath")
    if was_rpath:
        missing_before = before.missing if before else {}
        after = ldd_closure(chroot, tree, prefix, [host[p] for p in was_rpath]).missing
        broken = [p for p in was_rpath if set(after.get(p, ())) - set(missing_before.get(p, ()))]
        if broken:
            chroot.run(["/bin/bash", "-c",
                        'for f in "$@"; do patchelf --force-rpath --set-rpath "$(patchelf --print-rpath "$f")" "$f" '
                        '|| exit 1; done', "rpath-back", *broken], what="patchelf --force-rpath")
            log(f"{len(broken)} objects keep a DT_RPATH (their bundled libraries need it): "
                f"{', '.join(Path(p).name for p in broken[:5])}")
    log(f"patched {len(executables)} executables and {len(todo)} RUNPATH objects")


def check_isolated(chroot: Chroot, prefix: str, python: str, imports: list[str]) -> None:
    """Import ``imports`` with the bundled python; fail if any library came from outside."""
    code = (
        "import importlib, sys\n"
        f"for m in {imports!r}: importlib.import_module(m)\n"
        "bad = set()\n"
        "for line in open('/proc/self/maps'):\n"
        "    parts = line.split()\n"
        "    if len(parts) >= 6 and '.so' in parts[5] and not parts[5].startswith(sys.argv[1]):\n"
        "        bad.add(parts[5])\n"
        "print('\\n'.join(sorted(bad)))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    try:
        # -B: nothing may be written into the tree (beartype's import hook would
        # leave timestamped .pyc that differ build to build)
        chroot.run([python, "-I", "-B", "-c", code, prefix.rstrip("/") + "/"], what="isolation check",
                   env={"LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    except PayloadError as exc:
        raise PayloadError(f"the payload's python loads libraries from outside {prefix}: {exc}") from None
