"""Disk-full as a one-line ``PayloadError`` naming the disk, its free space and the fix."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from imagefarm.errors import PayloadError


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
