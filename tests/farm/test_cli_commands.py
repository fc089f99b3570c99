"""Commands a user types that had no test: `imagefarm demo` on a fresh state directory,
`dev up`/`dev down` (on ports of this test's own, chosen through IMAGEFARM_TO and
IMAGEFARM_BROKER_URL, never the usual 5000/6379 other agents use), and `launch
preflight/prepare/mig-fix` on the command line, all through the installed console script."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagefarm.host.containers import run
from imagefarm.farm.lockfile import Lockfile
from imagefarm.host.proc import pid_alive
from imagefarm.settings import Settings
from imagefarm.host.services import free_port
from tests.conftest import imagefarm_cli

pytestmark = pytest.mark.timeout(1500)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_demo_on_a_fresh_state_dir_then_launch_then_dev_down(tmp_path, cache_dir, payload):
    state = tmp_path / "fresh" / "state"  # does not exist: the demo makes everything
    rport, bport = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFARM_")}
    env.update(IMAGEFARM_STATE_DIR=str(state), IMAGEFARM_CACHE_DIR=str(cache_dir),
               IMAGEFARM_TO=f"127.0.0.1:{rport}/prebuilt", IMAGEFARM_BROKER_URL=f"redis://127.0.0.1:{bport}/0")
    pids: dict[str, int] = {}
    try:
        demo = imagefarm_cli("demo", "--bases", "2", "--verify", "all", env=env, timeout=1200)
        assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-4000:]
        assert "Traceback" not in demo.stderr
        assert oct(state.stat().st_mode & 0o777) == "0o700"  # the state directory is private
        pids = {n: int((state / "dev" / f"{n}.pid").read_text()) for n in ("registry", "redis")}
        assert all(pid_alive(p) for p in pids.values()) and _listening(rport) and _listening(bport)
        lockfile, dataset = state / "demo" / "lock.json", state / "demo" / "train.jsonl"
        lock = Lockfile.read(lockfile)
        assert len(lock.entries) == 2 and all(e.verified for e in lock.entries)
        for e in lock.entries:  # what the demo prints for each base: its pinned, verified image
            assert e.pinned in demo.stdout and e.image.startswith(f"127.0.0.1:{rport}/prebuilt/")
        catalog = httpx.get(f"http://127.0.0.1:{rport}/v2/_catalog", timeout=30).json()["repositories"]
        assert {e.image.split("/", 1)[1].rsplit(":", 1)[0] for e in lock.entries} <= set(catalog)  # on the chosen port

        again = imagefarm_cli("dev", "up", env=env)  # idempotent: the same services, nothing new
        assert again.returncode == 0 and all(f"pid {p}" in again.stdout for p in pids.values()), again.stdout

        # launch preflight on the demo's dataset and lockfile: ready
        pf = imagefarm_cli("launch", "preflight", "--dataset", str(dataset), "--lockfile", str(lockfile), "--json",
                           env=env)
        assert pf.returncode == 0, pf.stderr[-2000:]
        assert json.loads(pf.stdout) == {"ok": True, "checked": 2, "problems": []}
        # one base more than the lockfile holds: exit 1, naming it and the command that builds it
        extra = tmp_path / "more.jsonl"
        extra.write_text(dataset.read_text() + json.dumps({"docker_image": "namanjain12/absent_final:1"}) + "\n")
        pf = imagefarm_cli("launch", "preflight", "--dataset", str(extra), "--lockfile", str(lockfile), env=env)
        assert pf.returncode == 1 and "not ready" in pf.stderr
        assert "imagefarm derive docker.io/namanjain12/absent_final:1" in pf.stdout

        # launch prepare: a SkyRL parquet of the same bases, pinned by digest, and train.env
        rows = [{"prompt": "fix it", "data_source": "r2e-gym", "instance": {"instance_id": e.base}}
                for e in lock.entries]
        (tmp_path / "skyrl").mkdir()
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "skyrl" / "train.parquet")
        out = tmp_path / "run"
        prep = imagefarm_cli("launch", "prepare", "--dataset", str(tmp_path / "skyrl"), "--lockfile", str(lockfile),
                             "--out", str(out), "--runtime-url", "http://runtime.node:3000",
                             env={**env, "ALLHANDS_API_KEY": "k-123"})
        assert prep.returncode == 0, prep.stderr[-2000:]
        pinned = [r["instance"]["instance_id"] for r in pq.read_table(out / "train.parquet").to_pylist()]
        assert sorted(pinned) == sorted(e.pinned for e in lock.entries)
        train_env = (out / "train.env").read_text()
        assert "SANDBOX_REMOTE_RUNTIME_API_URL" in train_env and "k-123" in train_env
        assert oct((out / "train.env").stat().st_mode & 0o777) == "0o600"

        # launch mig-fix: the snippet, sourced by bash, remaps MIG UUIDs to indices
        mig = imagefarm_cli("launch", "mig-fix", env=env)
        assert mig.returncode == 0
        sourced = subprocess.run(["bash", "-c", 'source /dev/stdin; echo "$CUDA_VISIBLE_DEVICES"'], input=mig.stdout,
                                 capture_output=True, text=True, env={**env, "CUDA_VISIBLE_DEVICES": "MIG-a1,MIG-b2,MIG-c3"})
        assert sourced.stdout.strip() == "0,1,2" and "remapped" in sourced.stderr
    finally:
        down = imagefarm_cli("dev", "down", env=env)
        run(Settings(state_dir=state, cache_dir=cache_dir), ["podman", "system", "reset", "--force"],
            check=False, timeout=300)
    assert down.returncode == 0 and down.stdout.strip() == "stopped: registry, redis", down.stdout
    assert not any(pid_alive(p) for p in pids.values())
    assert not _listening(rport) and not _listening(bport)
    assert imagefarm_cli("dev", "down", env=env).stdout.strip() == "stopped: nothing was running"
