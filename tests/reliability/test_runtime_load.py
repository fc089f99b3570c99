"""The runtime server under load, and what every runtime it starts looks like: 32
concurrent start -> ready -> use -> stop cycles on one node, each with its own random
session key, none privileged, none on the host network, nothing left behind.
(Killed-and-restarted with live runtimes, crash at start, 401s and 422s are in
tests/runtime/test_runtime_server.py.)"""

from __future__ import annotations

import concurrent.futures as cf
import json
import uuid

import httpx

from imagefarm.host.containers import run
from rtkit import API_KEY, our_containers, sdk_start_body, wait_pod_status

N = 32


def test_32_concurrent_start_stop_cycles(server_factory, prebuilt, rt_settings):
    with server_factory(max_runtimes=N) as srv:
        sids = [f"rel-{uuid.uuid4()}" for _ in range(N)]

        def start(sid: str) -> dict:
            with httpx.Client(headers={"X-API-Key": API_KEY}, timeout=300) as c:
                r = c.post(f"{srv.url}/start", json=sdk_start_body(prebuilt["busybox_base"], sid))
                assert r.status_code == 200, r.text
                ready = wait_pod_status(c, f"{srv.url}/sessions/{sid}", timeout=600, interval=0.2)
                assert httpx.get(f"{ready['url']}/alive", timeout=60).status_code == 200
                return r.json()

        with cf.ThreadPoolExecutor(N) as pool:
            started = list(pool.map(start, sids))
        names = our_containers(rt_settings, srv.manager.server_id)
        assert len(names) == N and len({s["url"] for s in started}) == N
        # session keys: one per runtime, random (distinct, long, not derived from the API key)
        keys = [s["session_api_key"] for s in started]
        assert len(set(keys)) == N and all(len(k) >= 32 for k in keys) and API_KEY not in "".join(keys)
        inspect = json.loads(run(rt_settings, ["podman", "inspect", *names]).stdout)
        for c in inspect:
            hc = c["HostConfig"]
            assert hc["Privileged"] is False, c["Name"]
            assert hc["NetworkMode"] != "host" and not hc.get("CapAdd"), c["Name"]
            env = dict(e.split("=", 1) for e in c["Config"]["Env"])
            assert env["SESSION_API_KEY"] in keys
        assert len({dict(e.split("=", 1) for e in c["Config"]["Env"])["SESSION_API_KEY"] for c in inspect}) == N

        def stop(s: dict) -> int:
            with httpx.Client(headers={"X-API-Key": API_KEY}, timeout=300) as c:
                return c.post(f"{srv.url}/stop", json={"runtime_id": s["runtime_id"]}).status_code

        with cf.ThreadPoolExecutor(N) as pool:
            assert list(pool.map(stop, started)) == [200] * N
        assert our_containers(rt_settings, srv.manager.server_id) == []
        with httpx.Client(headers={"X-API-Key": API_KEY}, timeout=60) as c:
            assert c.get(f"{srv.url}/list").json()["runtimes"] == []
            assert c.get(f"{srv.url}/health").json()["runtimes"] == 0
