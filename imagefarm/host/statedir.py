"""Private state directories: made 0700, and refused when someone else could have made them.

A state directory holds podman's ``containers.conf`` and storage, runtime records with
session keys, batch state. On a shared node ``/tmp/imagefarm-runtime-<job>`` can be made
first by another user with their own ``containers.conf`` in it; ``mkdir -p`` would
accept it. ``private_dir`` creates the directory 0700 and refuses one that is not a
real directory owned by this user with mode 0700, or whose parents another user could
swap (``runtime_server.sbatch`` does the same in bash before anything runs). Every
path under the state directory is made through it (``state_subdir``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from imagefarm.errors import ConfigError


def check_ancestors(path: Path) -> None:
    """Refuse ``path`` when someone else could swap one of its parents: walking up,
    every directory must be this user's or root's and writable by no one else, until
    a root-owned one (what root keeps is root's business) or a sticky one (``/tmp``:
    others cannot rename or remove what is ours in it)."""
    me = os.getuid()
    for parent in Path(os.path.abspath(path)).parents:
        try:
            st = os.stat(parent)
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        sticky = bool(mode & stat.S_ISVTX)
        if st.st_uid not in (me, 0):
            raise ConfigError(f"state directory {path}: its parent {parent} belongs to uid {st.st_uid}, who could "
                              "replace what is under it; choose a directory of your own (IMAGEFARM_STATE_DIR)")
        if mode & 0o022 and not sticky:
            raise ConfigError(f"state directory {path}: its parent {parent} is writable by others (mode {mode:04o}) "
                              "and not sticky, so anyone could swap it; choose another IMAGEFARM_STATE_DIR, "
                              f"or `chmod o-w,g-w {parent}` (or `chmod +t`) if it is yours")
        if sticky or st.st_uid == 0:
            return


def private_dir(path: Path | str) -> Path:
    """``path`` as a directory only this user can use (created 0700 if absent), below
    parents no one else can swap (``check_ancestors``)."""
    path = Path(path)
    check_ancestors(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"state directory {path} is not a directory (a symlink or file is there): "
                          "remove it or choose another IMAGEFARM_STATE_DIR")
    if st.st_uid != os.getuid():
        raise ConfigError(f"state directory {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}): "
                          "another user may have made it first to plant their own configuration; "
                          "choose another IMAGEFARM_STATE_DIR")
    if stat.S_IMODE(st.st_mode) != 0o700:
        raise ConfigError(f"state directory {path} has mode {stat.S_IMODE(st.st_mode):04o}, not 0700: others "
                          f"could change what podman reads there; if it is yours, `chmod 700 {path}`, "
                          "or choose another IMAGEFARM_STATE_DIR")
    return path


def state_subdir(state_dir: Path | str, *names: str) -> Path:
    """``state_dir/<names...>``, the state directory and each level private."""
    path = private_dir(state_dir)
    for name in names:
        path = private_dir(path / name)
    return path
