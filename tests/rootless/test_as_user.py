"""Everything a cluster user runs, run as a normal user: rootless podman, the payload
fetched from the registry (mounted, never downloaded), per-job node-local storage.

The payload is built once by root (the session ``payload`` fixture) and published with
``imagefarm payload push``; the user's caches start empty. What moved is counted from
the registry's access log."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagefarm.registry import RegistryClient
from imagefarm.serve.launch import read_env_file
from imagefarm.names.reference import parse
from imagefarm.host.samples import R2E_REPOS
from imagefarm.host.services import free_port
from imagefarm.testing.slurm import SlurmCluster
from tests.conftest import IMAGEFARM

REPO = Path(__file__).resolve().parents[2]
SDK_CLIENT = REPO / "tests/runtime/sdk_client.py"


def _root_cli(*args: str, settings, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IMAGEFARM_STATE_DIR": str(settings.state_dir),
           "IMAGEFARM_CACHE_DIR": str(settings.cache_dir)}
    return subprocess.run([IMAGEFARM, *args], capture_output=True, text=True, env=env, timeout=timeout)


def _blob_gets(rreg, digest: str) -> list[str]:
    """imagefarm's downloads of ``digest`` (podman pulling an image to run it is not one)."""
    return [r for r in rreg.requests(agent="imagefarm/") if r.startswith("GET ") and f"/blobs/{digest}" in r]


@pytest.fixture(scope="module")
def pushed(settings, rreg, payload):
    """Root publishes its payload under ``<rreg>/team`` (what `payload push` is for)."""
    first = _root_cli("payload", "push", "--to", f"{rreg.host}/team", "--json", settings=settings)
    assert first.returncode == 0, first.stderr
    again = _root_cli("payload", "push", "--to", f"{rreg.host}/team", "--json", settings=settings)
    assert again.returncode == 0, again.stderr
    doc, doc2 = json.loads(first.stdout), json.loads(again.stdout)
    assert doc["layer"] == payload.layer.digest and doc2["digest"] == doc["digest"]
    assert doc2["blob_uploaded"] is False  # idempotent: the second push sends no layer
    assert doc["artifact"] == f"{rreg.host}/team/imagefarm-payload:{payload.recipe_digest.replace(':', '-')}"
    return doc


@pytest.fixture(scope="module")
def base(rfixtures):
    return rfixtures.r2e_base(R2E_REPOS[1], "5" * 40)


@pytest.fixture(scope="module")
def user_derived(as_user, rreg, pushed, payload, base):
    """The user derives ``base`` with an empty cache: the payload comes from the registry."""
    env = as_user.env(as_user.job("derive"))
    proc = as_user.imagefarm("derive", base.ref, "--to", f"{rreg.host}/team", "--json", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout), env


@pytest.mark.slow
def test_derive_mounts_the_published_payload_and_downloads_nothing(as_user, rreg, payload, user_derived):
    doc, env = user_derived
    d = payload.layer.digest
    assert _blob_gets(rreg, d) == [], "the payload layer must never be downloaded"
    assert rreg.requests(agent="imagefarm/"), "the registry logs imagefarm's User-Agent"
    mounts = [r for r in rreg.requests() if r.startswith("POST ") and f"mount={d}" in r]
    assert any("from=team/imagefarm-payload" in r for r in mounts), mounts
    with RegistryClient() as c:
        m = c.get_manifest(parse(doc["ref"]))
        cfg = json.loads(c.get_blob_bytes(parse(doc["ref"]), m.config.digest))
    assert m.layers[-1].digest == d and cfg["rootfs"]["diff_ids"][-1] == payload.layer.diff_id
    cache = Path(env["IMAGEFARM_CACHE_DIR"])
    big = [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size > 1_000_000]
    assert big == [], f"nothing of the payload may land in the user's cache: {big}"


@pytest.mark.slow
def test_payload_from_another_prefix_and_the_one_line_when_none_has_it(as_user, rreg, pushed, payload, base):
    env = as_user.env(as_user.job("elsewhere"))
    none = as_user.imagefarm("derive", base.ref, "--to", f"{rreg.host}/empty", env=env)
    assert none.returncode == 2 and "Traceback" not in none.stderr
    msg = " ".join(none.stderr.split())
    assert "imagefarm payload build --recipe default" in msg and "imagefarm payload push" in msg, msg
    assert "--payload-from" in msg
    got = as_user.imagefarm("derive", base.ref, "--to", f"{rreg.host}/other",
                            "--payload-from", f"{rreg.host}/team", "--json", env=env)
    assert got.returncode == 0, got.stderr
    assert _blob_gets(rreg, payload.layer.digest) == []  # mounted team -> other, same registry


@pytest.mark.slow
def test_verify_as_user_with_rootless_podman(as_user, user_derived):
    doc, env = user_derived
    proc = as_user.imagefarm("verify", doc["ref"], "--json", env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["ok"] is True and result["expected_prefix"] == "/testbed/.venv", result
    # the image went into the user's own storage under the job's state dir
    storage = Path(env["IMAGEFARM_STATE_DIR"]) / "containers" / "storage"
    assert storage.is_dir() and storage.stat().st_uid == as_user.user.uid


@pytest.fixture(scope="module")
def user_prebuilt(as_user, rreg, pushed, rfixtures, redis_server):
    """The user prebuilds a SkyRL-shaped dataset (one base) into ``<rreg>/pb`` through a
    Celery worker the user runs on a node with an empty cache, verified, with a lockfile;
    the payload is found under ``--payload-from``."""
    b = rfixtures.r2e_base(R2E_REPOS[2], "6" * 40)
    worker_env = as_user.env({**as_user.job("worker"), "IMAGEFARM_BROKER_URL": redis_server.url})
    log = as_user.work / "worker.log"
    worker = as_user.popen([str(as_user.bin / "imagefarm"), "worker", "--concurrency", "1"], worker_env, log)
    env = as_user.env({**as_user.job("prebuild"), "IMAGEFARM_BROKER_URL": redis_server.url})
    data = as_user.work / "data"
    as_user.user.owns(data)
    rows = [{"prompt": "fix it", "data_source": "r2e-gym", "instance": {"instance_id": b.ref, "repo": "aiohttp"}}]
    for split in ("train", "validation"):
        pq.write_table(pa.Table.from_pylist(rows), data / f"{split}.parquet")
        os.chown(data / f"{split}.parquet", as_user.user.uid, as_user.user.gid)
    lock = as_user.work / "lock.json"
    try:
        proc = as_user.imagefarm("prebuild", "--dataset", str(data), "--to", f"{rreg.host}/pb",
                                 "--payload-from", f"{rreg.host}/team", "--executor", "celery",
                                 "--verify", "all", "--lockfile", str(lock), "--json", env=env, timeout=1200)
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:] + log.read_text()[-3000:]
    return json.loads(proc.stdout), b, data, lock, log, Path(worker_env["IMAGEFARM_CACHE_DIR"])


@pytest.mark.slow
def test_prebuild_and_worker_as_user(as_user, rreg, pushed, payload, user_prebuilt):
    summary, _b, _data, lock, worker_log, worker_cache = user_prebuilt
    assert summary["verified"] == 1 and summary["failed"] == 0, summary
    log = worker_log.read_text()
    assert "derive" in log and "verify" in log and "succeeded" in log  # the worker did both tasks
    assert _blob_gets(rreg, payload.layer.digest) == []
    big = [p for p in worker_cache.rglob("*") if p.is_file() and p.stat().st_size > 1e6]
    assert big == [], f"the worker mounted the payload: nothing of it in its cache {big}"
    # the driver published the payload in the target registry, so its workers mount it
    with RegistryClient() as c:
        assert c.head_manifest(parse(pushed["artifact"].replace("/team/", "/pb/"))) is not None
    assert lock.stat().st_uid == as_user.user.uid


@pytest.mark.slow
def test_launch_preflight_as_user(as_user, rreg, user_prebuilt):
    _summary, _b, data, lock, _log, _cache = user_prebuilt
    env = as_user.env(as_user.job("preflight"))
    proc = as_user.imagefarm("launch", "preflight", "--dataset", str(data), "--lockfile", str(lock),
                             "--to", f"{rreg.host}/pb", "--json", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["ok"] is True


def _sdk_exec(sdk_python, url: str, key: str, image: str, startup: float = 120) -> dict:
    proc = sdk_python.run(SDK_CLIENT, url, key, image, "--exec", f"--startup-timeout={startup}", timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    steps = {s["step"]: s for s in (json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{"))}
    assert steps["ready"]["alive"] is True
    assert steps["exec"]["exit_code"] == 0 and "from-sdk" in steps["exec"]["stdout"], steps["exec"]
    assert "/testbed/.venv" in steps["exec"]["stdout"]
    assert steps["stopped"]["runtime_id"] == steps["ready"]["runtime_id"]
    return steps


def _server_processes(user: str) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-u", user, "-o", "args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "runtime serve" in line]


@contextlib.contextmanager
def _user_server(as_user, env: dict[str, str], name: str, port_range: str, *extra: str):
    """``imagefarm runtime serve`` as the user: (url, key, port, log) once its URL is written;
    stopped (SIGTERM to its group) after."""
    key = secrets.token_urlsafe(24)
    port = free_port()
    url_file = as_user.work / f"runtime-url-{name}"
    env = {**env, "IMAGEFARM_RUNTIME_API_KEY": key}
    log = as_user.work / f"server-{name}.log"
    proc = as_user.popen([str(as_user.bin / "imagefarm"), "runtime", "serve", "--port", str(port),
                          "--port-range", port_range, "--url-file", str(url_file), *extra], env, log)
    try:
        deadline = time.monotonic() + 120
        while not url_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        yield url_file.read_text().strip(), key, port, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(60)


@pytest.mark.slow
def test_runtime_server_started_by_the_user_serves_api_remote_workspace(as_user, rreg, user_derived, base,
                                                                          sdk_python):
    """The trainer's client (root here, another process in real life) talks to a
    runtime server the user started: the sandbox runs in the user's rootless podman."""
    _doc, env = user_derived
    with _user_server(as_user, {**env, "IMAGEFARM_TO": f"{rreg.host}/team"}, "sdk", "38600-38699") as (url, key, port, _):
        assert any(str(port) in line for line in _server_processes(as_user.user.name))
        # a loaded 2-core machine: the first start of an image in rootless storage took 79 s once
        _sdk_exec(sdk_python, url, key, base.ref, startup=600)


@pytest.mark.soak
def test_twenty_rootless_starts_in_a_row(as_user, rreg, user_derived, base):
    """By hand (``pytest -m soak -s -k twenty_rootless``, ``ROOTLESS_STARTS=40`` for more):
    starts of one image, one at a time, on a runtime server the user runs; each must turn
    ready. Prints each start's seconds to ready (and a failed one's logs) and the
    server's own start->ready figures."""
    import httpx

    from tests.runtime.rtkit import sdk_start_body

    _doc, env = user_derived
    rows = []
    with _user_server(as_user, {**env, "IMAGEFARM_TO": f"{rreg.host}/team"}, "soak", "38500-38599",
                      "--stop-on-exit") as (url, key, _port, log):
        try:
            with httpx.Client(headers={"X-API-Key": key}, timeout=60) as c:
                for i in range(int(os.environ.get("ROOTLESS_STARTS", "20"))):
                    sid = f"soak-{i}-{secrets.token_hex(4)}"
                    t0 = time.monotonic()
                    started = c.post(f"{url}/start", json=sdk_start_body(base.ref, sid))
                    assert started.status_code == 200, started.text
                    while (st := c.get(f"{url}/sessions/{sid}").json())["pod_status"] not in (
                            "ready", "failed", "crashloopbackoff", "unknown"):
                        time.sleep(0.05)
                    rows.append((i, st["pod_status"], round(time.monotonic() - t0, 2)))
                    print(f"ROOTLESS-START {i}: {st['pod_status']} after {rows[-1][2]}s", flush=True)
                    if st["pod_status"] != "ready":
                        print(f"ROOTLESS-FAILED {st.get('restart_reasons')}\n{st.get('pod_logs')}\n"
                              f"--- server log ---\n{log.read_text(errors='replace')[-6000:]}", flush=True)
                    c.post(f"{url}/stop", json={"runtime_id": st["runtime_id"]})
        finally:
            boots = re.findall(r"ready in ([0-9.]+)s after /start", log.read_text(errors="replace"))
            print(f"ROOTLESS-STARTS {rows}; the server's own start->ready: {boots}", flush=True)
    assert [r for r in rows if r[1] != "ready"] == [], rows


def _wait_job(cluster, job, timeout=600):
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = cluster.state(job)
        if st in done:
            return st
        time.sleep(1)
    return cluster.state(job)


@pytest.mark.slow
def test_slurm_jobs_launched_by_the_user_run_the_runtime_server(as_user, rreg, user_prebuilt, sdk_python):
    """`imagefarm launch sbatch` as the user: the runtime-server job runs as that user on
    the (real) SLURM node with node-local storage; the trainer's SDK client uses it."""
    _summary, b, data, lock, _log, _cache = user_prebuilt
    work = as_user.work.parent / "slurm"
    work.mkdir(mode=0o755)
    with SlurmCluster.create(work) as cluster:
        # users reach munged through its socket and read slurm.conf (the key stays root's)
        (work / "munge").chmod(0o711)
        run_dir = as_user.work / "slurm-run"
        as_user.user.owns(run_dir)
        env = as_user.env({"SLURM_CONF": str(cluster.conf), "IMAGEFARM_TO": f"{rreg.host}/pb",
                           "RUNTIME_BIND": "127.0.0.1", "RUNTIME_PUBLIC_HOST": "127.0.0.1",
                           "RUNTIME_PORT_RANGE": "38700-38799", "IMAGEFARM": str(as_user.bin / "imagefarm")})
        small = ["--cpus-per-task=1", "--mem=1G"]
        sub = as_user.imagefarm("launch", "sbatch", "--dataset", str(data), "--lockfile", str(lock),
                                "--run-dir", str(run_dir), *[f"--runtime-sbatch-arg={a}" for a in small],
                                *[f"--train-sbatch-arg={a}" for a in small], "--", "sleep", "900", env=env)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        jobs = json.loads((run_dir / "jobs.json").read_text())
        url_file = run_dir / "runtime_url"
        try:
            deadline = time.monotonic() + 300
            while not url_file.exists():
                st = cluster.state(jobs["runtime"])
                logs = "".join(p.read_text(errors="replace") for p in run_dir.glob("runtime-*.log"))
                assert st in ("PENDING", "RUNNING", "CONFIGURING") and time.monotonic() < deadline, \
                    f"runtime job {st}:\n{logs[-3000:]}\n{cluster.logs()}"
                time.sleep(0.5)
            for job in jobs.values():
                info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                                      env=cluster.env).stdout
                assert re.search(rf"UserId={re.escape(as_user.user.name)}\(", info), info
            key = read_env_file(run_dir / "train.env")["ALLHANDS_API_KEY"]
            # the job's storage is fresh (node-local, per job): the first start pulls the image
            _sdk_exec(sdk_python, url_file.read_text().strip(), key, b.ref, startup=600)
            assert _server_processes(as_user.user.name)
        finally:
            for job in jobs.values():
                cluster.cancel(job)
            states = [_wait_job(cluster, job, timeout=180) for job in jobs.values()]
        assert all(st in ("CANCELLED", "COMPLETED") for st in states), states
        deadline = time.monotonic() + 60
        while url_file.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not url_file.exists()  # the runtime job cleaned up after itself


def test_doctor_as_user_sees_what_rootless_needs(as_user):
    env = as_user.env(as_user.job("doctor"))
    proc = as_user.imagefarm("doctor", "--no-services", "--json", env=env, timeout=300)
    checks = {c["part"]: c for c in json.loads(proc.stdout)}
    for part in ("subuid", "subgid", "newuidmap", "newgidmap", "slirp4netns", "/dev/net/tun",
                 "user namespaces", "mmdebstrap", "storage driver", "podman run"):
        assert checks[part]["ok"], checks[part]
    assert checks["storage driver"]["detail"].endswith(f"{env['IMAGEFARM_STATE_DIR']}/containers/storage")
    assert proc.returncode == 0, proc.stdout


@pytest.mark.slow
def test_nothing_written_outside_the_users_state_and_cache(as_user, user_derived):
    """After the user's derive/verify/prebuild/runtime runs of this module: every file the
    user owns in HOME and the temporary directories is in a job's state/cache dir, its
    runtime dir (podman's run root), the SLURM job's node-local state dir, or the user's
    own signing key pair (made on first use under XDG_CONFIG_HOME/imagefarm/keys). podman's
    rootless lock segment in /dev/shm (shared memory, not disk) is the one exception."""
    allowed = [as_user.work / "jobs", as_user.work / "run", as_user.work / "slurm-run", as_user.work / "data",
               *Path("/tmp").glob("imagefarm-runtime-*")]
    keys = as_user.work / "home/.config/imagefarm/keys"
    extra = {as_user.work / n for n in ("lock.json", "worker.log", "server-sdk.log", "runtime-url-sdk",
                                        "server-soak.log", "runtime-url-soak")}
    extra |= {keys / "farm.key", keys / "farm.pub"}
    shm_lock = Path(f"/dev/shm/libpod_rootless_lock_{as_user.user.uid}")
    outside = [f for f in as_user.written_outside(allowed) if Path(f) not in extra and Path(f) != shm_lock]
    assert outside == []
