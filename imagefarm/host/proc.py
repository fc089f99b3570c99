"""Process helpers shared by the dev stack and the batch state."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists (signal 0 probes without signalling)."""
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
