"""A stopped server or node leaves no mount under its state directory: podman's overlay
driver keeps a bind mount of its home after some commands (a failed run leaves it), and
the directory then cannot be removed ("Device or resource busy")."""

from __future__ import annotations

import shutil

from imagefarm.host.containers import release_mounts, run
from imagefarm.settings import Settings


def _mounted(root) -> list[str]:
    return [line.split()[4] for line in open("/proc/self/mountinfo") if str(root) in line.split()[4]]


def test_release_mounts_leaves_the_state_dir_removable(tmp_path):
    state = tmp_path / "state"
    s = Settings(state_dir=state)
    failed = run(s, ["podman", "run", "--rm", "--pull=never", "localhost/imagefarm-absent:1", "true"], check=False)
    assert failed.returncode != 0
    assert _mounted(state), "precondition: podman left its overlay bind mount"  # the fault landed
    assert release_mounts(s) and _mounted(state) == []
    shutil.rmtree(state)  # nothing busy
