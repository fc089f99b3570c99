"""End to end on a real single-node SLURM: `imagefarm launch sbatch` submits the
runtime-server job (which writes its URL file) and a CPU stand-in for the training
job, which reads the pinned dataset and env file, starts one runtime with the
OpenHands client, runs /testbed/run_tests.sh in it, and stops it."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagefarm.host.containers import run
from imagefarm.farm.lockfile import Lockfile
from imagefarm.farm.prebuild import run_batch
from imagefarm.testing.slurm import SlurmCluster
from tests.conftest import imagefarm_cli

HERE = Path(__file__).resolve().parent


@pytest.fixture
def slurm(tmp_path):
    with SlurmCluster.create(tmp_path / "slurm") as cluster:
        yield cluster


def _wait(cluster, job, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
          timeout=900):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = cluster.state(job)
        if st in states:
            return st
        time.sleep(1)
    return cluster.state(job)


@pytest.mark.slow
def test_launch_on_slurm(slurm, settings, fixtures, registry, payload, sdk_python, tmp_path):
    to = f"{registry.host}/slurm"
    st = settings.model_copy(update={"to": to})
    bases = [fixtures.r2e_base("namanjain12/numpy_final", c * 40).ref for c in ("8", "9")]
    data = tmp_path / "r2e-all"
    data.mkdir()
    rows = [{"prompt": "fix it", "data_source": "r2e-gym", "instance": {"instance_id": b, "repo": "numpy"}}
            for b in bases]
    pq.write_table(pa.Table.from_pylist(rows), data / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), data / "validation.parquet")
    lockfile = tmp_path / "lock.json"
    result = run_batch(st, str(data), verify="all", lockfile=lockfile)
    assert result.state.verified == 2, result.state.failures
    assert all(e.verified for e in Lockfile.read(lockfile).entries)

    run_dir = tmp_path / "run"
    env = {**slurm.env, "IMAGEFARM_STATE_DIR": str(st.state_dir), "IMAGEFARM_CACHE_DIR": str(st.cache_dir),
           "IMAGEFARM_TO": to, "RUNTIME_BIND": "127.0.0.1", "RUNTIME_PUBLIC_HOST": "127.0.0.1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "IMAGEFARM_SDK_ARGV": json.dumps(sdk_python.argv(HERE / "train_client.py"))}
    small = ["--cpus-per-task=1", "--mem=1G"]
    args = ["launch", "sbatch", "--dataset", str(data), "--lockfile", str(lockfile), "--run-dir", str(run_dir),
            *[f"--runtime-sbatch-arg={a}" for a in small], *[f"--train-sbatch-arg={a}" for a in small]]
    dry = imagefarm_cli(*args, "--dry-run", "--", sys.executable, str(HERE / "train_standin.py"), env=env)
    assert dry.returncode == 0, dry.stderr
    assert "runtime_server.sbatch" in dry.stdout and "train_job.sbatch" in dry.stdout
    assert not (run_dir / "jobs.json").exists()

    sub = imagefarm_cli(*args, "--", sys.executable, str(HERE / "train_standin.py"), env=env)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    jobs = json.loads((run_dir / "jobs.json").read_text())
    try:
        state = _wait(slurm, jobs["train"])
        train_log = "".join(p.read_text(errors="replace") for p in run_dir.glob("train-*.log"))
        runtime_log = "".join(p.read_text(errors="replace") for p in run_dir.glob("runtime-*.log"))
        assert state == "COMPLETED", f"train job {state}\n{train_log[-4000:]}\n--- runtime\n{runtime_log[-3000:]}"
        url = (run_dir / "runtime_url").read_text().strip()
        assert url.startswith("http://127.0.0.1:")
        steps = {s["step"]: s for s in (json.loads(x) for x in train_log.splitlines() if x.startswith("{"))}
        assert steps["dataset"]["url"] == url and "@sha256:" in steps["dataset"]["image"]
        assert steps["tests"]["exit_code"] == 0, steps["tests"]
        assert "OK" in steps["tests"]["stdout"] + steps["tests"]["stderr"]
        assert "stopped" in steps
        pinned = pq.read_table(run_dir / "data" / "train.parquet").to_pylist()
        assert all("@sha256:" in r["instance"]["instance_id"] for r in pinned)
    finally:
        slurm.cancel(jobs["runtime"])
        _wait(slurm, jobs["runtime"], timeout=120)
    deadline = time.monotonic() + 60
    while (run_dir / "runtime_url").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not (run_dir / "runtime_url").exists()  # the server job cleans up after itself
    left = run(st, ["podman", "ps", "-a", "--filter", "label=imagefarm.runtime=1", "--format", "{{.Names}}"]).stdout
    assert left.strip() == ""
