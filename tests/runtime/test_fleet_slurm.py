"""A fleet on a real two-node SLURM cluster made on this machine.

``runtime_server.sbatch`` runs under ``sbatch --nodes 2``: the front on the first
node, one ``imagefarm runtime node`` per node through ``srun``, each with its own
state directory and podman storage, its API and runtime ports on its node's address
(127.0.1.N, the NodeAddr SLURM knows). The trainer side is the real SDK client
(APIRemoteWorkspace) and plain HTTP shaped like it. What was pulled is read from the
registry's access log; what runs, from each node's own podman storage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from imagefarm.host.samples import R2E_REPOS, commit_for
from imagefarm.testing.slurm import SlurmCluster

from rtkit import our_containers, sdk_start_body, wait_pod_status

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

HERE = Path(__file__).resolve().parent
SCRIPT = HERE.parents[1] / "runtime" / "runtime_server.sbatch"
IMAGEFARM = str(Path(sys.executable).parent / "imagefarm")
SMALL = ("--cpus-per-task=1", "--mem=1G")  # the script asks for a real node's share
NODE_TIMEOUT = 3.0  #: the front's --node-timeout in this job


def _sid() -> str:
    return f"agent-server-{uuid.uuid4()}"


def _poll(cond, what: str, timeout: float = 120, interval: float = 0.1, fail=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{fail()}"
        time.sleep(interval)


class Fleet:
    """The running job, as a trainer and an operator see it."""

    def __init__(self, cluster, job, url, key, fleet_key_file, state, settings):
        self.cluster, self.job, self.url, self.key = cluster, job, url, key
        self.fleet_key_file, self.state, self.settings = fleet_key_file, state, settings
        self.http = httpx.Client(headers={"X-API-Key": key}, timeout=120, trust_env=False)

    def nodes(self) -> list[dict]:
        return self.http.get(f"{self.url}/nodes").json()

    def node_of(self, runtime: dict) -> dict:
        host = runtime["url"].split("//", 1)[1].rsplit(":", 1)[0]
        return next(n for n in self.nodes() if n["address"] == host)

    def node_state_dir(self, node: dict, job: str | None = None) -> Path:
        i = node["address"].rsplit(".", 1)[1]
        return self.state / f"node-ifnode{i}-{job or self.job}"

    def node_settings(self, node: dict, job: str | None = None):
        return self.settings.model_copy(update={"state_dir": self.node_state_dir(node, job)})

    def start(self, image: str, sid: str | None = None) -> dict:
        r = self.http.post(f"{self.url}/start", json=sdk_start_body(image, sid or _sid()))
        assert r.status_code == 200, r.text
        return r.json()

    def stop_all(self) -> None:
        for rt in self.http.get(f"{self.url}/list").json()["runtimes"]:
            self.http.post(f"{self.url}/stop", json={"runtime_id": rt["runtime_id"]})


@pytest.fixture(scope="module")
def standins(rt_settings, fixtures, standin_layer, rt_to):
    """Five small prebuilt images (the stand-in agent server on distinct r2e bases)."""
    from imagefarm.derive import Appender, AppendPayload
    from imagefarm.payload.recipe import recipe_for

    recipe = recipe_for(rt_settings)
    payload = AppendPayload(standin_layer, recipe.name, recipe.digest, recipe.agent_server_version, ())
    bases = [fixtures.r2e_base(R2E_REPOS[1], commit_for(f"fleet-{i}")) for i in range(5)]
    with Appender(rt_settings) as appender:
        return [(b.ref, appender.derive(b.ref, payload, to=rt_to)) for b in bases]


@pytest.fixture(scope="module")
def agent_images(rt_settings, fixtures, payload, rt_to):
    """Two r2e bases with the REAL agent-server payload appended (what a trainer starts)."""
    from imagefarm.derive import Appender, AppendPayload
    from imagefarm.payload.recipe import recipe_for

    bases = [fixtures.r2e_base(R2E_REPOS[4], c * 40) for c in ("5", "6")]
    with Appender(rt_settings) as appender:
        for b in bases:
            appender.derive(b.ref, AppendPayload.of(payload, recipe_for(rt_settings)), to=rt_to)
    return [b.ref for b in bases]


@pytest.fixture(scope="module")
def fleet(rt_settings, prebuilt, tmp_path_factory):
    work = tmp_path_factory.mktemp("fleet-slurm")
    with SlurmCluster.create(work / "slurm", nodes=2) as cluster:
        run = work / "run"
        url_file = run / "runtime_url"
        state = work / "state"
        env = {"IMAGEFARM_RUNTIME_URL_FILE": str(url_file), "IMAGEFARM_STATE_DIR": str(state),
               "IMAGEFARM_CACHE_DIR": str(rt_settings.cache_dir), "IMAGEFARM_TO": rt_settings.to,
               "RUNTIME_BIND": "advertise", "RUNTIME_SLOTS": "2", "RUNTIME_NODE_TIMEOUT": f"{NODE_TIMEOUT:g}",
               "RUNTIME_IMAGE_CACHE_GIB": "0.001", "IMAGEFARM": IMAGEFARM}
        env_all = {k: v for k, v in os.environ.items() if k != "IMAGEFARM_RUNTIME_API_KEY"}
        job = cluster.sbatch(SCRIPT, "--nodes", "2", *SMALL, f"--output={work}/job-%j.log", env={**env_all, **env})
        log = work / f"job-{job}.log"
        _poll(lambda: url_file.exists() and url_file.read_text().strip(),
              "the front's URL file", 120, fail=lambda: cluster.logs() + (log.read_text() if log.exists() else ""))
        url = url_file.read_text().strip()
        key = Path(f"{url_file}.key").read_text().strip()
        f = Fleet(cluster, job, url, key, Path(f"{url_file}.fleet-key"), state, rt_settings)
        _poll(lambda: len([n for n in f.nodes() if n["ready"] and n["state"] == "up"]) == 2, "two nodes joined")
        yield f
        f.stop_all()
        cluster.cancel(job)
        _poll(lambda: cluster.state(job) not in ("RUNNING", "PENDING", "COMPLETING"), "the job to end", 60)
        out = log.read_text()
        assert key not in out and f.fleet_key_file.read_text().strip() not in out
        for d in state.glob("node-*"):  # the job's end removed every runtime of every node
            assert our_containers(rt_settings.model_copy(update={"state_dir": d})) == []


@pytest.fixture(autouse=True)
def _nothing_left_running(fleet):
    """Each test starts on an empty fleet, whatever the one before it left."""
    yield
    fleet.stop_all()


def test_nodes_joined_with_their_own_addresses_and_state(fleet):
    nodes = fleet.nodes()
    assert sorted(n["address"] for n in nodes) == ["127.0.1.1", "127.0.1.2"]
    assert all(n["slots"] == 2 and n["free_slots"] == 2 for n in nodes)
    for n in nodes:
        assert (fleet.node_state_dir(n) / "runtime" / "runtimes.sqlite").exists()
        assert oct(fleet.node_state_dir(n).joinpath("runtime").stat().st_mode & 0o777) == "0o700"
    assert fleet.url.startswith("http://") and fleet.fleet_key_file.stat().st_mode & 0o077 == 0


def test_real_sdk_workspaces_on_both_nodes_run_in_testbed(fleet, agent_images, sdk_python, registry):
    # the trainer prefetches its first instances: spread over the nodes, one image each
    r = fleet.http.post(f"{fleet.url}/prefetch", json={"images": agent_images})
    assert r.status_code == 200, r.text
    planned = r.json()["images"]
    assert len({p["node"] for p in planned}) == 2 and all(p["pull"] for p in planned)
    # each node: its join-time payload pull, then the one image planned for it
    _poll(lambda: all(n["stats"].get("pulling") == 0 and n["stats"].get("pulls", 0) >= 2 for n in fleet.nodes()),
          "the prefetches", 600, 1)
    gets = len(registry.blob_gets())
    procs = [subprocess.Popen(sdk_python.argv(HERE / "sdk_client.py", fleet.url, fleet.key, img, "--exec",
                                                 "--startup-timeout=480"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for img in agent_images]
    outs = [p.communicate(timeout=600) for p in procs]
    steps = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
        steps.append({s["step"]: s for s in (json.loads(x) for x in out.splitlines() if x.startswith("{"))})
    hosts = {s["ready"]["host"].split("//", 1)[1].rsplit(":", 1)[0] for s in steps}
    assert hosts == {"127.0.1.1", "127.0.1.2"}  # one workspace on each node, named by the node's address
    for s in steps:
        assert s["exec"]["exit_code"] == 0 and "from-sdk" in s["exec"]["stdout"], s["exec"]
        assert "/testbed/.venv" in s["exec"]["stdout"]
        assert s["stopped"]["runtime_id"] == s["ready"]["runtime_id"]
    pulled = [(a.method, a.path, a.status, getattr(a, "agent", "")) for a in registry.accesses()
              if a.method == "GET" and "/blobs/sha256:" in a.path and a.status in (200, 307)][gets:]
    assert pulled == [], pulled  # prefetched: the starts pulled nothing


def test_second_start_lands_where_the_image_is_and_pulls_nothing(fleet, standins, registry):
    base, derived = standins[0]
    first = fleet.start(base)
    wait_pod_status(fleet.http, f"{fleet.url}/sessions/{first['session_id']}", timeout=120)
    node = fleet.node_of(first)
    gets = registry.blob_gets()
    second = fleet.start(base)
    wait_pod_status(fleet.http, f"{fleet.url}/sessions/{second['session_id']}", timeout=120)
    assert fleet.node_of(second)["node_id"] == node["node_id"]
    assert registry.blob_gets() == gets  # not one blob fetched for the second start
    names = our_containers(fleet.node_settings(node))
    assert {f"imagefarm-rt-{first['runtime_id']}", f"imagefarm-rt-{second['runtime_id']}"} <= set(names)
    # that node is full now (2 slots): the next image goes to the other one
    other = fleet.start(standins[1][0])
    assert fleet.node_of(other)["node_id"] != node["node_id"]
    fleet.stop_all()


def _images(settings) -> set[str]:
    from imagefarm.host.containers import run

    out = run(settings, ["podman", "images", "--format", "{{.Digest}}"]).stdout
    return set(out.split())


def test_small_cache_budget_evicts_idle_images_keeps_running_ones(fleet, standins):
    """Budget 1 MiB per node: every pull evicts what no runtime uses, nothing running."""
    (b_fill, _), (b_w, d_w), (b_y, d_y), (b_z, d_z) = standins[:4]
    fill = [fleet.start(b_fill) for _ in range(2)]  # fills one node: the rest go to the other
    full = fleet.node_of(fill[0])
    w = fleet.start(b_w)
    node = fleet.node_of(w)
    assert node["node_id"] != full["node_id"]
    wait_pod_status(fleet.http, f"{fleet.url}/sessions/{w['session_id']}", timeout=120)
    fleet.http.post(f"{fleet.url}/stop", json={"runtime_id": w["runtime_id"]})  # W: idle now
    st = fleet.node_settings(node)
    repo = lambda d: d.digest  # noqa: E731 - the same repository, distinct images
    assert repo(d_w) in _images(st)
    y = fleet.start(b_y)
    wait_pod_status(fleet.http, f"{fleet.url}/sessions/{y['session_id']}", timeout=120)
    assert fleet.node_of(y)["node_id"] == node["node_id"]
    assert repo(d_w) not in _images(st)  # evicted: idle, and the budget had no room for Y
    z = fleet.start(b_z)  # Y runs: its image stays whatever the budget says
    wait_pod_status(fleet.http, f"{fleet.url}/sessions/{z['session_id']}", timeout=120)
    assert fleet.node_of(z)["node_id"] == node["node_id"]
    assert {repo(d_y), repo(d_z)} <= _images(st)
    assert httpx.get(f"{y['url']}/alive", timeout=5).status_code == 200
    row = next(n for n in fleet.nodes() if n["node_id"] == node["node_id"])
    assert row["stats"]["evictions"] >= 1
    metrics = fleet.http.get(f"{fleet.url}/metrics").text
    assert f'imagefarm_runtime_image_evictions_total{{node="{node["node_id"]}"}}' in metrics
    fleet.stop_all()


def test_second_job_joins_the_running_fleet_and_leaves_it(fleet, standins, rt_settings):
    env = {k: v for k, v in os.environ.items() if k != "IMAGEFARM_RUNTIME_API_KEY"}
    env.update(IMAGEFARM_FLEET_KEY_FILE=str(fleet.fleet_key_file), IMAGEFARM_STATE_DIR=str(fleet.state),
               IMAGEFARM_CACHE_DIR=str(rt_settings.cache_dir), IMAGEFARM_TO=rt_settings.to,
               RUNTIME_BIND="advertise", RUNTIME_SLOTS="4", IMAGEFARM=IMAGEFARM,
               RUNTIME_CPUS_PER_FACTOR="0.5")  # 4 slots fit this 2-CPU host only at half a CPU each
    job2 = fleet.cluster.sbatch(SCRIPT, "--nodes", "1", *SMALL, f"--output={fleet.state}/job2-%j.log",
                                env=env, script_args=("--join", fleet.url))
    before = {n["node_id"] for n in fleet.nodes()}
    new = _poll(lambda: [n for n in fleet.nodes() if n["node_id"] not in before and n["ready"]], "the third node", 120)
    assert new[0]["slots"] == 4
    try:
        # an idle, empty node with 4 slots is the least loaded: an image no node holds goes there
        rt = fleet.start(standins[4][0])
        wait_pod_status(fleet.http, f"{fleet.url}/sessions/{rt['session_id']}", timeout=120)
        st = fleet.node_settings(new[0], job2)  # its node shares an address with the first job's: its storage says
        assert f"imagefarm-rt-{rt['runtime_id']}" in our_containers(st)
    finally:
        fleet.cluster.cancel(job2)
    left = _poll(lambda: [n for n in fleet.nodes() if n["node_id"] == new[0]["node_id"] and n["state"] == "left"],
                 "the third node to leave", 60)
    assert left
    gone = fleet.http.get(f"{fleet.url}/sessions/{rt['session_id']}").json()
    assert gone["pod_status"] == "failed" and "left the fleet" in gone["restart_reasons"][0]
    _poll(lambda: our_containers(st) == [], "the leaving node to remove its runtime", 60)
    fleet.stop_all()


def test_killed_node_process_turns_its_runtimes_failed_and_a_restart_cleans_up(fleet, standins):
    rt = fleet.start(standins[2][0])
    wait_pod_status(fleet.http, f"{fleet.url}/sessions/{rt['session_id']}", timeout=120)
    node = fleet.node_of(rt)
    state = fleet.node_state_dir(node)
    pid = int((state / "runtime" / "server.lock").read_text().strip())
    assert "runtime" in Path(f"/proc/{pid}/cmdline").read_text() and "node" in Path(f"/proc/{pid}/cmdline").read_text()
    os.kill(pid, signal.SIGKILL)  # mid-run: its runtime is ready and serving
    t0 = time.monotonic()
    # the front's promise: a lost node's runtimes are failed within 2 x --node-timeout
    failed = _poll(lambda: (d := fleet.http.get(f"{fleet.url}/sessions/{rt['session_id']}").json())["pod_status"]
                   == "failed" and d, f"the runtime to be reported failed within 2 x {NODE_TIMEOUT:g} s",
                   2 * NODE_TIMEOUT, 0.1)
    print(f"\nnode SIGKILLed -> runtime failed after {time.monotonic() - t0:.1f}s (node timeout {NODE_TIMEOUT:g}s)")
    assert failed["status"] == "error" and "stopped answering" in failed["restart_reasons"][0]
    assert node["node_id"] in failed["restart_reasons"][0]
    assert next(n for n in fleet.nodes() if n["node_id"] == node["node_id"])["state"] == "lost"
    st = fleet.node_settings(node)
    left = our_containers(st)
    assert f"imagefarm-rt-{rt['runtime_id']}" in left  # the crash left its container
    # the node process started again on the same state: it removes what it left, and rejoins
    env = {k: v for k, v in os.environ.items() if k != "IMAGEFARM_RUNTIME_API_KEY"}
    env.update(IMAGEFARM_STATE_DIR=str(state), IMAGEFARM_CACHE_DIR=str(fleet.settings.cache_dir),
               IMAGEFARM_TO=fleet.settings.to)
    log = open(state / "restarted.log", "wb")
    proc = subprocess.Popen([IMAGEFARM, "runtime", "node", "--join", fleet.url, "--fleet-key-file",
                             str(fleet.fleet_key_file), "--host", node["address"], "--advertise", node["address"],
                             "--slots", "2", "--heartbeat", "0.5"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _poll(lambda: any(n["node_id"] == node["node_id"] and n["state"] == "up" for n in fleet.nodes()),
              "the restarted node to rejoin", 60)
        assert our_containers(st) == []
        assert f"removing the {len(left)} container(s)" in (state / "restarted.log").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
