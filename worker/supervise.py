"""``imagefarm worker``: run a Celery worker and start it again when it dies.

Celery's worker retries a lost broker connection, but its main process can still exit
on one ("Unrecoverable error: AttributeError(\"'NoneType' object has no attribute
'hostname'\")" from kombu's Redis transport when Redis is SIGKILLed: a race between the
connection's teardown and a channel still using it, seen with celery/kombu 5.7.0). A
worker that is gone serves no queue, so this loop restarts it, logging each exit code;
the tasks the dead worker held come back through the broker when their lease runs out
(``lease.py``). The child runs in its own process group, so leftover pool processes are
killed with it; SIGTERM/SIGINT to the supervisor are passed on (warm shutdown) and end
the loop. Exit codes that mean "wrong command line" are not retried.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from typing import Callable

#: Celery's exit codes for a bad command line or configuration (EX_USAGE, EX_CONFIG; 2: click)
NO_RESTART = {2, 64, 78}
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the supervisor itself is killed (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def celery_argv(queues: str, concurrency: int, loglevel: str, hostname: str | None = None) -> list[str]:
    argv = [sys.executable, "-m", "celery", "-A", "imagefarm.worker.app", "worker", "-Q", queues,
            "--concurrency", str(concurrency), "--loglevel", loglevel, "--without-gossip", "--without-mingle"]
    return argv + (["-n", hostname] if hostname else [])


def supervise(argv: list[str], log: Callable[[str], None], *, max_backoff: float = 30.0,
              healthy_after: float = 60.0) -> int:
    """Run ``argv`` until it exits cleanly or we are told to stop; returns the exit code."""
    stopping: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum, _frame) -> None:
        stopping.append(signum)
        if child is not None and child.poll() is None:
            try:
                os.killpg(child.pid, signum)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    backoff, restarts = 1.0, 0
    try:
        while True:
            started = time.monotonic()
            child = subprocess.Popen(argv, start_new_session=True, preexec_fn=_die_with_parent)
            log(f"celery worker started (pid {child.pid})" + (f", restart {restarts}" if restarts else ""))
            code = child.wait()
            _reap_group(child.pid)
            if stopping or code == 0:
                return 0 if stopping and code in (0, -signal.SIGTERM, -signal.SIGINT) else code
            why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            if code in NO_RESTART:
                log(f"celery worker exited with {why} (a usage or configuration error): not restarting")
                return code
            if time.monotonic() - started > healthy_after:
                backoff = 1.0
            restarts += 1
            log(f"celery worker exited with {why} after {time.monotonic() - started:.0f}s; "
                f"starting it again in {backoff:.0f}s (restart {restarts})")
            deadline = time.monotonic() + backoff
            while time.monotonic() < deadline and not stopping:
                time.sleep(0.1)
            if stopping:
                return 0
            backoff = min(backoff * 2, max_backoff)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _reap_group(pgid: int) -> None:
    """Pool processes the dead main process left behind (they would hold tasks' leases
    nowhere and compete with the next worker) are killed."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
