"""Farm fixtures: a dataset of fixture bases, real Celery workers as processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
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
    """Workers started as a user starts them, ``imagefarm worker`` (the supervisor, its
    Celery worker and that worker's pool processes; heartbeats on), stopped or killed
    by the test."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env, self.logdir, self.procs, self.names = env, logdir, [], []

    def start(self, queues: str = "derive,verify", concurrency: int = 1, name: str | None = None) -> subprocess.Popen:
        from tests.conftest import IMAGEFARM

        name = name or f"w{len(self.procs)}"
        log = open(self.logdir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [IMAGEFARM, "worker", "--queues", queues, "--concurrency", str(concurrency), "-n", f"{name}@%h"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        self.names.append(name)
        return proc

    @staticmethod
    def children(pid: int) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def celery_main(self, proc: subprocess.Popen) -> int | None:
        """The Celery worker's main process under ``imagefarm worker`` (None between restarts)."""
        kids = self.children(proc.pid)
        return kids[0] if kids else None

    def pool(self, proc: subprocess.Popen) -> list[int]:
        main = self.celery_main(proc)
        return self.children(main) if main else []

    def log(self, i: int = 0) -> str:
        return (self.logdir / f"{self.names[i]}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)  # the supervisor passes it on and ends
        deadline = time.monotonic() + 15
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                main = self.celery_main(p)
                if main:
                    os.killpg(main, signal.SIGKILL)  # the Celery worker has its own group
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


@pytest.fixture
def workers(cli_env, tmp_path):
    w = Workers(cli_env, tmp_path)
    yield w
    w.stop_all()
