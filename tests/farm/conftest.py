"""Farm fixtures: a dataset of fixture bases, real Celery workers as processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


N_BASES = 20


@pytest.fixture(scope="session")
def farm_bases(fixtures):
    return [b.ref for b in fixtures.r2e_set(N_BASES)]


@pytest.fixture
def dataset(tmp_path, farm_bases) -> Path:
    """SkyRL-shaped rows (instance.instance_id is the image), one duplicate, one bad row."""
    rows = [{"data_source": "r2e-gym", "instance": {"instance_id": b, "repo": b.split("/")[-1]}} for b in farm_bases]
    rows.append(rows[0])
    rows.append({"data_source": "r2e-gym", "instance": {"instance_id": "Not A Valid Ref"}})
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Workers:
    """Celery workers as separate processes, stopped (or killed) by the test."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env, self.logdir, self.procs = env, logdir, []

    def start(self, queues: str = "derive,verify", concurrency: int = 1, name: str | None = None) -> subprocess.Popen:
        name = name or f"w{len(self.procs)}"
        log = open(self.logdir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "imagefarm.worker.app", "worker", "-Q", queues,
             "--concurrency", str(concurrency), "-P", "prefork", "-n", f"{name}@%h", "--loglevel", "INFO",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def children(self, proc: subprocess.Popen) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def log(self, i: int = 0) -> str:
        return (self.logdir / f"w{i}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


@pytest.fixture
def workers(cli_env, tmp_path):
    w = Workers(cli_env, tmp_path)
    yield w
    w.stop_all()
