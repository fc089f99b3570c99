"""The runtime server against real podman, with requests shaped exactly like the clients'."""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import time
import uuid

import httpx
import pytest

from imagefarm.host.containers import run

from rtkit import API_KEY, our_containers, sdk_start_body, wait_pod_status

pytestmark = pytest.mark.timeout(300)


def _sid(prefix: str = "agent-server") -> str:
    return f"{prefix}-{uuid.uuid4()}"


def _count_parses(monkeypatch, text: str) -> list[str]:
    """Wrap ``names.reference.parse`` wherever a loaded module holds it; the calls on ``text``."""
    import sys

    from imagefarm.names import reference

    orig, calls = reference.parse, []

    def counting(value, *a, **k):
        if value == text:
            calls.append(value)
        return orig(value, *a, **k)
    for mod in [m for m in list(sys.modules.values()) if getattr(m, "parse", None) is orig]:
        monkeypatch.setattr(mod, "parse", counting)
    return calls


def test_sdk_start_ready_agent_writes_testbed_stop(server_factory, client, prebuilt, rt_settings, caplog,
                                                   monkeypatch):
    caplog.set_level(logging.INFO, logger="imagefarm.runtime")
    with server_factory() as srv:
        sid = _sid()
        assert client.get(f"{srv.url}/sessions/{sid}").status_code == 404  # SDK: 404 means new

        parses = _count_parses(monkeypatch, prebuilt["r2e_base"])
        r = client.post(f"{srv.url}/start", json=sdk_start_body(prebuilt["r2e_base"], sid))
        assert r.status_code == 200, r.text
        started = r.json()
        assert started["runtime_id"] and started["url"].startswith("http://127.0.0.1:")
        assert started["session_api_key"] and started["status"] == "running"
        assert started["pod_status"] in ("pending", "running")
        assert started["prebuilt_image"] == f"{prebuilt['r2e'].image.rsplit(':', 1)[0]}@{prebuilt['r2e'].digest}"
        assert "work_hosts" in started

        ready = wait_pod_status(client, f"{srv.url}/sessions/{sid}")
        assert ready["status"] == "running" and ready["runtime_id"] == started["runtime_id"]
        assert len(parses) == 1  # the request's image is parsed once, at the edge, from /start to ready
        assert ready["container_statuses"][0]["ready"] is True
        # what the SDK then does: GET {url}/health without any header
        assert httpx.get(f"{started['url']}/health", timeout=5).status_code == 200
        assert httpx.get(f"{started['url']}/alive", timeout=5).status_code == 200

        name = f"imagefarm-rt-{started['runtime_id']}"
        # run_as_user 10001 asked, the image is root-owned without user 10001: the image user runs it
        out = run(rt_settings, ["podman", "exec", name, "sh", "-c",
                                "id -u; echo from-agent > /testbed/agent_wrote.txt && cat /testbed/agent_wrote.txt; "
                                "printenv SESSION_API_KEY; printenv LITELLM_LOCAL_MODEL_COST_MAP"]).stdout.split()
        assert out[0] == "0"
        assert out[1] == "from-agent"
        assert out[2] == started["session_api_key"]
        assert out[3] == "True"
        logs = run(rt_settings, ["podman", "logs", name]).stdout
        assert "port 60000, uid 0, cwd /" in logs
        labels = json.loads(run(rt_settings, ["podman", "inspect", "--format", "{{json .Config.Labels}}", name]).stdout)
        assert labels["imagefarm.runtime"] == "1" and labels["imagefarm.runtime.session"] == sid
        assert labels["imagefarm.runtime.id"] == started["runtime_id"]
        assert labels["imagefarm.runtime.server"] == srv.manager.server_id
        hc = json.loads(run(rt_settings, ["podman", "inspect", "--format", "{{json .HostConfig}}", name]).stdout)
        assert hc["Privileged"] is False and hc["NetworkMode"] != "host"
        assert hc["PidsLimit"] == 4096 and hc["Memory"] == 512 * 1024 * 1024

        # a second /start for the same live session answers the same runtime
        again = client.post(f"{srv.url}/start", json=sdk_start_body(prebuilt["r2e_base"], sid)).json()
        assert again["runtime_id"] == started["runtime_id"]

        assert client.post(f"{srv.url}/stop", json={"runtime_id": started["runtime_id"]}).status_code == 200
        assert client.get(f"{srv.url}/sessions/{sid}").status_code == 404
        assert name not in our_containers(rt_settings)
    text = caplog.text
    assert "requested run_as_user 10001 not applied" in text and "sysbox-runc" in text
    assert started["session_api_key"] not in text and API_KEY not in text


def test_missing_or_wrong_key_is_401_and_starts_nothing(server_factory, prebuilt, rt_settings):
    with server_factory() as srv:
        body = sdk_start_body(prebuilt["busybox_base"], _sid())
        assert httpx.post(f"{srv.url}/start", json=body).status_code == 401
        r = httpx.post(f"{srv.url}/start", json=body, headers={"X-API-Key": "wrong"})
        assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]
        for path in ("/list", f"/sessions/{body['session_id']}", "/registry_prefix", "/image_exists?image=x"):
            assert httpx.get(srv.url + path).status_code == 401
        assert httpx.post(f"{srv.url}/start", json={"garbage": 1}).status_code == 401  # auth before validation
        assert our_containers(rt_settings, srv.manager.server_id) == []
        assert srv.manager.records == {}
        # the server's own liveness needs no key
        h = httpx.get(f"{srv.url}/alive")
        assert h.status_code == 200 and h.json()["auth"] is True
        assert httpx.get(f"{srv.url}/openapi.json").json()["paths"]["/start"]


def test_base_without_prebuilt_image_is_404_naming_base_and_command(server_factory, client, fixtures,
                                                                     rt_settings, rt_to, prebuilt):
    lonely = fixtures.r2e_base("namanjain12/tornado_final", "f" * 40)  # pushed, never derived
    with server_factory() as srv:
        r = client.post(f"{srv.url}/start", json=sdk_start_body(lonely.ref, _sid()))
        assert r.status_code == 404
        detail = r.json()["detail"]
        assert lonely.ref in detail
        assert f"imagefarm derive {lonely.ref} --to {rt_to}" in detail and "imagefarm prebuild" in detail
        assert "never builds" in detail
        ie = client.get(f"{srv.url}/image_exists", params={"image": lonely.ref}).json()
        assert ie["exists"] is False and "imagefarm derive" in ie["detail"]
        assert our_containers(rt_settings, srv.manager.server_id) == []
        assert srv.manager.records == {}
        bad = client.post(f"{srv.url}/start", json=sdk_start_body("Not A Ref!!", _sid()))
        assert bad.status_code == 400 and "invalid" in bad.json()["detail"].lower()


def test_eight_concurrent_starts_all_ready_then_stopped(server_factory, client, prebuilt, rt_settings):
    with server_factory() as srv:
        sids = [_sid() for _ in range(8)]

        def start(sid):
            t0 = time.monotonic()
            with httpx.Client(headers={"X-API-Key": API_KEY}, timeout=60) as c:
                r = c.post(f"{srv.url}/start", json=sdk_start_body(prebuilt["busybox_base"], sid))
                assert r.status_code == 200, r.text
                wait_pod_status(c, f"{srv.url}/sessions/{sid}")
                return r.json(), time.monotonic() - t0

        with cf.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(start, sids))
        urls = {r["url"] for r, _ in results}
        assert len(urls) == 8
        for r, _ in results:
            assert httpx.get(f"{r['url']}/alive", timeout=5).status_code == 200
        listed = client.get(f"{srv.url}/list").json()["runtimes"]
        assert {x["session_id"] for x in listed} == set(sids)
        assert all(x["pod_status"] == "ready" for x in listed)
        assert len(our_containers(rt_settings, srv.manager.server_id)) == 8
        with cf.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda r: client.post(f"{srv.url}/stop", json={"runtime_id": r[0]["runtime_id"]}).status_code,
                                  results))
        assert codes == [200] * 8
        assert our_containers(rt_settings, srv.manager.server_id) == []
        assert client.get(f"{srv.url}/list").json()["runtimes"] == []


def test_crash_at_start_is_failed_with_log_lines(server_factory, client, prebuilt, rt_settings):
    with server_factory() as srv:
        sid = _sid()
        body = sdk_start_body(prebuilt["busybox_base"], sid, environment={"STANDIN_CRASH": "cannot open database"})
        rid = client.post(f"{srv.url}/start", json=body).json()["runtime_id"]
        deadline = time.monotonic() + 30
        while (data := client.get(f"{srv.url}/sessions/{sid}").json())["pod_status"] not in ("failed", "crashloopbackoff"):
            assert time.monotonic() < deadline, data
            time.sleep(0.1)
        assert data["pod_status"] == "failed" and data["status"] == "error"
        assert "fatal: cannot open database" in data["pod_logs"] and "stand-in: starting up" in data["pod_logs"]
        assert "exited with code 3" in data["restart_reasons"][0]
        v0 = client.get(f"{srv.url}/runtime/{rid}").json()
        assert v0["pod_status"] == "failed" and v0["runtime_id"] == rid
        # a failed runtime does not count against the cap, and /stop removes it
        assert client.get(f"{srv.url}/health").json()["runtimes"] == 0
        assert client.post(f"{srv.url}/stop", json={"runtime_id": rid}).status_code == 200
        assert our_containers(rt_settings, srv.manager.server_id) == []


def test_v0_client_shapes(server_factory, client, prebuilt, rt_to):
    """Requests exactly as openhands-ai 0.59's RemoteRuntime / RemoteRuntimeBuilder send them."""
    with server_factory() as srv:
        # _build_runtime: /registry_prefix, then RemoteRuntimeBuilder.image_exists / build
        assert client.get(f"{srv.url}/registry_prefix").json() == {"registry_prefix": rt_to}
        ie = client.get(f"{srv.url}/image_exists", params={"image": prebuilt["busybox_base"]}).json()
        assert ie["exists"] is True
        assert isinstance(ie["image"]["image_size_bytes"], int) and ie["image"]["image_size_bytes"] > 0
        assert isinstance(ie["image"]["upload_time"], str)
        assert ie["image"]["prebuilt_image"].endswith(prebuilt["busybox"].digest)
        derived = client.get(f"{srv.url}/image_exists", params={"image": prebuilt["busybox"].image}).json()
        assert derived["exists"] is True  # an already derived reference resolves to itself

        r = client.post(f"{srv.url}/build", files=[("context", ("context.tar.gz", "aGk=")),
                                                  ("target_image", (None, f"{rt_to}/runtime:oh_v0.59.0_x"))])
        assert r.status_code == 501 and "prebuilt images only" in r.json()["detail"]
        r = client.get(f"{srv.url}/build_status", params={"build_id": "b1"})
        assert r.status_code == 501 and "never builds" in r.json()["detail"]

        # _start_runtime: command is a list; the stand-in can run this one
        sid = _sid("v0")
        start = {"image": prebuilt["busybox_base"],
                 "command": ["/usr/local/bin/openhands-agent-server", "--port", "60000"],
                 "working_dir": "/openhands/code/", "environment": {"DEBUG": "true"},
                 "session_id": sid, "resource_factor": 1, "runtime_class": "sysbox-runc"}
        started = client.post(f"{srv.url}/start", json=start).json()
        assert set(started) >= {"runtime_id", "url", "work_hosts", "session_api_key"}
        rid = started["runtime_id"]
        # _wait_until_alive_impl: GET /runtime/{id} until pod_status ready, then {url}/alive
        data = wait_pod_status(client, f"{srv.url}/runtime/{rid}")
        assert data["runtime_id"] == rid and data["restart_count"] == 0 and data["restart_reasons"] == []
        assert httpx.get(f"{started['url']}/alive", headers={"X-Session-API-Key": started["session_api_key"]}).status_code == 200
        # _check_existing_runtime: /sessions/{sid} -> status running
        assert client.get(f"{srv.url}/sessions/{sid}").json()["status"] == "running"
        listed = client.get(f"{srv.url}/list").json()
        assert [x["runtime_id"] for x in listed["runtimes"]] == [rid]
        batch = client.get(f"{srv.url}/sessions/batch", params=[("ids", sid), ("ids", "nope")]).json()
        assert [x["session_id"] for x in batch] == [sid]
        assert client.post(f"{srv.url}/stop", json={"runtime_id": rid}).status_code == 200

        # the V0 action execution server command asks for the v0 recipe's image: this base
        # has only an agent-server image, so the same clear 404, naming the recipe
        v0cmd = ["/openhands/micromamba/bin/micromamba", "run", "-n", "openhands", "poetry", "run", "python", "-u",
                 "-m", "openhands.runtime.action_execution_server", "60000", "--working-dir", "/workspace",
                 "--username", "root", "--user-id", "0", "--no-enable-browser"]
        r = client.post(f"{srv.url}/start", json={**start, "session_id": _sid("v0"), "command": v0cmd})
        assert r.status_code == 404, r.text
        assert "no prebuilt image of recipe v0 for" in r.json()["detail"] and "--recipe v0" in r.json()["detail"]
        assert client.get(f"{srv.url}/list").json()["runtimes"] == []


@pytest.mark.parametrize("body", [
    {"image": "x", "command": 123, "session_id": "s"},
    {"image": "x", "command": "c", "session_id": "s", "environment": {"A": 1}},
    {"image": "x", "command": "c", "session_id": "s", "environment": ["A=1"]},
    {"image": "x", "command": "c", "session_id": "s", "resource_factor": "big"},
    {"image": "x", "command": "c", "session_id": "s", "run_as_user": "root"},
    {"image": ["x"], "command": "c", "session_id": "s"},
    {"image": "x", "command": "c"},
    {"image": "x", "command": "", "session_id": "s"},
    {"image": "x", "command": [""], "session_id": "s"},
    {"image": "x", "command": "sh -c 'unbalanced", "session_id": "s"},
    {"image": "x", "command": "c", "session_id": "s", "environment": {"BAD NAME": "1"}},
    "not an object",
])
def test_wrong_body_types_are_422(server_factory, client, body):
    with server_factory() as srv:
        r = client.post(f"{srv.url}/start", json=body)
        assert r.status_code == 422, r.text
        for path in ("/stop", "/pause", "/resume"):
            assert client.post(srv.url + path, json={"runtime_id": ["a"]}).status_code == 422
            assert client.post(srv.url + path, content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 422
        assert srv.manager.records == {}


def test_pause_resume_and_capacity(server_factory, client, prebuilt, rt_settings):
    """(/start -> ready latency is measured by bench/runtime.py, not asserted here.)"""
    with server_factory(max_runtimes=2) as srv:
        a, b = _sid(), _sid()
        ra = client.post(f"{srv.url}/start", json=sdk_start_body(prebuilt["busybox_base"], a)).json()
        client.post(f"{srv.url}/start", json=sdk_start_body(prebuilt["busybox_base"], b))
        full = client.post(f"{srv.url}/start", json=sdk_start_body(prebuilt["busybox_base"], _sid()))
        assert full.status_code == 429 and "--max-runtimes" in full.json()["detail"]
        assert full.headers.get("Retry-After")
        wait_pod_status(client, f"{srv.url}/sessions/{a}")
        wait_pod_status(client, f"{srv.url}/sessions/{b}")
        assert len(our_containers(rt_settings, srv.manager.server_id)) == 2

        assert client.post(f"{srv.url}/pause", json={"runtime_id": ra["runtime_id"]}).json()["status"] == "paused"
        s = client.get(f"{srv.url}/sessions/{a}").json()
        assert s["status"] == "paused" and s["container_statuses"][0]["state"] == "paused"
        state = run(rt_settings, ["podman", "inspect", "--format", "{{.State.Status}}",
                                  f"imagefarm-rt-{ra['runtime_id']}"]).stdout.strip()
        assert state == "paused"
        res = client.post(f"{srv.url}/resume", json={"runtime_id": ra["runtime_id"]}).json()
        assert res["status"] == "running" and res["session_api_key"] == ra["session_api_key"]
        wait_pod_status(client, f"{srv.url}/sessions/{a}")
        assert httpx.get(f"{ra['url']}/alive", timeout=5).status_code == 200


def test_idle_runtimes_are_reaped(server_factory, client, prebuilt, rt_settings):
    with server_factory(idle_timeout=1.5) as srv:
        sid = _sid()
        rid = client.post(f"{srv.url}/start", json=sdk_start_body(prebuilt["busybox_base"], sid)).json()["runtime_id"]
        wait_pod_status(client, f"{srv.url}/sessions/{sid}")
        deadline = time.monotonic() + 20
        # no API call touches it meanwhile
        while rid in srv.manager.records or our_containers(rt_settings, srv.manager.server_id):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert client.get(f"{srv.url}/sessions/{sid}").status_code == 404


def test_restart_finds_runtimes_and_cleans_crash_leftovers(cli_server, prebuilt, rt_settings):
    srv = cli_server()
    url = srv.start()
    with httpx.Client(headers={"X-API-Key": API_KEY}, timeout=60) as c:
        server_id = c.get(f"{url}/health").json()["server_id"]
        sid = _sid()
        started = c.post(f"{url}/start", json=sdk_start_body(prebuilt["busybox_base"], sid)).json()
        wait_pod_status(c, f"{url}/sessions/{sid}")
        srv.kill()  # SIGKILL: no shutdown code runs
        name = f"imagefarm-rt-{started['runtime_id']}"
        assert name in our_containers(rt_settings, server_id)
        # a container of this server that has no state record: what a crash mid-start leaves
        run(rt_settings, ["podman", "run", "-d", "--name", "imagefarm-rt-leftover0001",
                          "--label", "imagefarm.runtime=1", "--label", f"imagefarm.runtime.server={server_id}",
                          "--label", "imagefarm.runtime.id=leftover0001", prebuilt["busybox"].ref, "sleep", "600"])

        url2 = srv.start()
        assert url2 == url
        again = wait_pod_status(c, f"{url}/sessions/{sid}")
        assert again["runtime_id"] == started["runtime_id"] and again["url"] == started["url"]
        assert again["session_api_key"] == started["session_api_key"]
        assert httpx.get(f"{started['url']}/alive", timeout=5).status_code == 200
        assert our_containers(rt_settings, server_id) == [name]
        assert "left by a crash" in srv.output()
        assert [r["runtime_id"] for r in c.get(f"{url}/list").json()["runtimes"]] == [started["runtime_id"]]
        assert c.post(f"{url}/stop", json={"runtime_id": started["runtime_id"]}).status_code == 200
        assert our_containers(rt_settings, server_id) == []
    srv.kill(__import__("signal").SIGTERM)
    assert API_KEY not in srv.output() and started["session_api_key"] not in srv.output()


def test_sbatch_script_writes_url_atomically_and_cleans_up(rt_settings, prebuilt, tmp_path):
    """runtime_server.sbatch run as SLURM would run it (a bash script; no cluster here)."""
    import os
    import signal
    import subprocess
    from pathlib import Path

    import imagefarm.runtime

    script = Path(imagefarm.runtime.__file__).with_name("runtime_server.sbatch")
    url_file = tmp_path / "shared" / "runtime_url"
    job_state = tmp_path / "job-state"  # the job's own, as on a node: nothing may stay mounted in it
    job_settings = rt_settings.model_copy(update={"state_dir": job_state})
    env = dict(os.environ, IMAGEFARM_RUNTIME_URL_FILE=str(url_file), IMAGEFARM_STATE_DIR=str(job_state),
               IMAGEFARM_CACHE_DIR=str(rt_settings.cache_dir), IMAGEFARM_TO=rt_settings.to,
               RUNTIME_PORT_RANGE="42000-42099", SLURM_JOB_ID="4242", SLURM_CPUS_PER_TASK="2",
               IMAGEFARM=str(Path(os.sys.executable).parent / "imagefarm"))
    env.pop("IMAGEFARM_RUNTIME_API_KEY", None)
    log = open(tmp_path / "job.log", "wb")
    job = subprocess.Popen(["bash", str(script)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not url_file.exists():
            assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "job.log").read_text()
            time.sleep(0.05)
        url = url_file.read_text().strip()
        fqdn = subprocess.run(["hostname", "-f"], capture_output=True, text=True).stdout.strip()
        assert url.startswith(f"http://{fqdn}:")
        key = Path(f"{url_file}.key").read_text().strip()
        assert oct(Path(f"{url_file}.key").stat().st_mode & 0o777) == "0o600"
        with httpx.Client(headers={"X-API-Key": key}, timeout=60) as c:
            assert c.get(f"{url}/health").json()["max_runtimes"] == 8
            sid = _sid()
            started = c.post(f"{url}/start", json=sdk_start_body(prebuilt["busybox_base"], sid)).json()
            assert started["url"].startswith(f"http://{fqdn}:420")  # published on the node, named by its FQDN
            wait_pod_status(c, f"{url}/sessions/{sid}")
            server_id = c.get(f"{url}/health").json()["server_id"]
        os.killpg(job.pid, signal.SIGTERM)  # what SLURM does at the end of a job
        job.wait(60)
        assert not url_file.exists()
        assert our_containers(job_settings, server_id) == []
        mounted = [line.split()[4] for line in open("/proc/self/mountinfo") if str(job_state) in line.split()[4]]
        assert mounted == [], mounted  # podman's overlay bind mount went with the job
        import shutil

        shutil.rmtree(job_state)  # and the directory can be removed ("Device or resource busy" before)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    out = (tmp_path / "job.log").read_text()
    assert "stopping 1 runtime(s) on exit" in out and key not in out


@pytest.mark.timeout(900)
def test_real_v0_client(cli_server, prebuilt, v0_images, rt_settings, v0_python):
    """openhands-ai 0.59's own RemoteRuntime (connect, a command in /testbed, close) on the
    real ``v0`` image of an r2e-style base, started by ``imagefarm runtime serve``, then
    its RemoteRuntimeBuilder's calls. The image is on the node first (as after a prefetch)."""
    import subprocess
    from pathlib import Path

    from imagefarm.farm.verify import pull

    pull(rt_settings, v0_images["r2e"].image)
    srv = cli_server()
    url = srv.start()
    try:
        proc = v0_python.run(Path(__file__).with_name("v0_client.py"), url, API_KEY,
                             v0_images["r2e_base"], prebuilt["busybox_base"], timeout=420)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the V0 client hung: {str(exc.stderr or '')[-3000:]}\n{srv.output()[-3000:]}") from None
    assert proc.returncode == 0, proc.stderr[-3000:] + srv.output()[-3000:]
    steps = {s["step"]: s for s in (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))}
    assert steps["ready"]["url"].startswith("http://127.0.0.1:") and steps["ready"]["session_api_key_set"]
    assert steps["ready"]["web_hosts"] == {}
    # the base's venv in the agent's shell, in /testbed (the server's --working-dir)
    assert steps["action"]["type"] == "CmdOutputObservation" and steps["action"]["exit_code"] == 0
    assert steps["action"]["content"].split() == ["/testbed/.venv", "/testbed"], steps["action"]
    assert steps["closed"]["runtime_id"] == steps["ready"]["runtime_id"]
    assert steps["image_exists"] == {"step": "image_exists", "base": True, "v0_runtime": False}
    assert steps["build"]["refused"] is True and "prebuilt images only" in steps["build"]["error"]
    # the V0 command was served by the v0 recipe's image of that base
    pinned = f"{v0_images['r2e'].image.rsplit(':', 1)[0]}@{v0_images['r2e'].digest}"
    assert f"-> {pinned}" in srv.output()
    assert httpx.get(f"{url}/list", headers={"X-API-Key": API_KEY}).json() == {"runtimes": []}

    # the trainer foresaw the next start: one warm V0 sandbox (the shape of the start just
    # seen); the same client, started again, is handed it and runs its command in /testbed
    keyed = {"X-API-Key": API_KEY}
    r = httpx.post(f"{url}/prefetch", headers=keyed, timeout=60,
                   json={"images": [v0_images["r2e_base"]], "recipe": "v0", "warm": 1})
    assert r.status_code == 200 and r.json()["images"][0]["warm"] == 1, r.text
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/nodes", headers=keyed).json()[0]["warm"] != {pinned: 1}:
        assert time.monotonic() < deadline, srv.output()[-3000:]
        time.sleep(0.2)
    proc = v0_python.run(Path(__file__).with_name("v0_client.py"), url, API_KEY,
                         v0_images["r2e_base"], prebuilt["busybox_base"], timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:] + srv.output()[-3000:]
    again = {s["step"]: s for s in (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))}
    assert again["action"]["exit_code"] == 0 and again["action"]["content"].split() == ["/testbed/.venv", "/testbed"]
    stats = httpx.get(f"{url}/nodes", headers=keyed).json()[0]["stats"]
    assert (stats["warm_hits"], stats["warm_misses"]) == (1, 1), stats
    assert "warm sandbox handed to session" in srv.output()


def test_cli_refuses_to_serve_without_a_key_and_warns_without_auth(rt_settings, tmp_path):
    import os
    import signal
    import subprocess
    from pathlib import Path

    exe = str(Path(os.sys.executable).parent / "imagefarm")
    env = dict(os.environ, IMAGEFARM_STATE_DIR=str(tmp_path / "st"), IMAGEFARM_TO=rt_settings.to)
    env.pop("IMAGEFARM_RUNTIME_API_KEY", None)
    r = subprocess.run([exe, "runtime", "serve", "--port", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "API key is required" in r.stderr and "--disable-auth" in r.stderr
    url_file = tmp_path / "url"
    p = subprocess.Popen([exe, "runtime", "serve", "--port", "0", "--disable-auth", "--url-file", str(url_file)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not url_file.exists():
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        url = url_file.read_text().strip()
        assert httpx.get(f"{url}/list").json() == {"runtimes": []}  # no key needed
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        out = p.communicate(timeout=30)[0]
    assert "AUTHENTICATION DISABLED" in out
