"""Cached root filesystems made with debootstrap (no public image registry is reachable).

A rootfs is built once into a temporary directory and renamed into the cache only
when complete, so an interrupted build never leaves a half cache behind.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from .containers import which
from imagefarm.errors import ToolError

MIRROR = "http://deb.debian.org/debian"


def debootstrap(cache_dir: Path, suite: str, include: list[str], *, variant: str = "minbase",
                post: list[list[str]] | None = None, mirror: str = MIRROR, log=None) -> Path:
    """A debootstrapped ``suite`` rootfs with ``include`` packages, cached by its recipe.

    ``post`` commands run inside the rootfs (``chroot``) before it is cached.
    """
    key = hashlib.sha256(repr((suite, sorted(include), variant, post, mirror)).encode()).hexdigest()[:16]
    final = cache_dir / "rootfs" / f"{suite}-{key}"
    if (final / ".complete").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{suite}-", dir=final.parent))
    try:
        if log:
            log(f"debootstrap {suite} ({', '.join(include)}) into the cache; this takes about a minute once")
        argv = [which("debootstrap"), f"--variant={variant}", f"--include={','.join(include)}", suite, str(work), mirror]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise ToolError(f"debootstrap {suite} failed (is {mirror} reachable?):\n{tail}")
        for cmd in post or []:
            proc = subprocess.run(["chroot", str(work), *cmd], capture_output=True, text=True,
                                  env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                       "HOME": "/root", "LANG": "C.UTF-8"})
            if proc.returncode != 0:
                raise ToolError(f"`{' '.join(cmd)}` in the {suite} rootfs failed:\n{proc.stderr[-2000:]}")
        # apt caches and logs are not part of an image
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "var/log"):
            p = work / junk
            if p.is_dir():
                for child in p.iterdir():
                    if child.is_file():
                        child.unlink()
        (work / ".complete").write_text(key)
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
        return final
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def busybox_binary(cache_dir: Path) -> Path:
    """Debian's static busybox (from the busybox-static package), cached."""
    target = cache_dir / "busybox-static" / "busybox"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        work = Path(tmp)
        proc = subprocess.run(["apt-get", "download", "busybox-static"], cwd=work, capture_output=True, text=True)
        debs = list(work.glob("busybox-static_*.deb"))
        if proc.returncode != 0 or not debs:
            raise ToolError(
                f"could not download Debian's busybox-static (run `apt-get update` first):\n{proc.stderr[-1000:]}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(work / "x")], check=True)
        shutil.copy2(work / "x" / "bin" / "busybox", work / "busybox")
        (work / "busybox").replace(target)
    return target
