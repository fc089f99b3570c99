"""A fleet in one process: a front and two node processes (threads), each node with its
own podman storage, state and loopback address; real podman, real registry."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from conftest import FLEET_KEY
from rtkit import API_KEY, our_containers, sdk_start_body, wait_pod_status

pytestmark = pytest.mark.timeout(300)


def _sid() -> str:
    return f"agent-server-{uuid.uuid4()}"


def _node_settings(node):
    return node.manager.settings


def test_front_places_by_image_forwards_and_answers_from_reports(fleet_factory, client, prebuilt):
    with fleet_factory(nodes=2, slots=2) as running:
        front, nodes = running.front, running.nodes
        by_id = {n.manager.server_id: n for n in nodes}
        a1, a2, b1 = _sid(), _sid(), _sid()
        ra1 = client.post(f"{front.url}/start", json=sdk_start_body(prebuilt["busybox_base"], a1)).json()
        ra2 = client.post(f"{front.url}/start", json=sdk_start_body(prebuilt["busybox_base"], a2)).json()
        rb1 = client.post(f"{front.url}/start", json=sdk_start_body(prebuilt["r2e_base"], b1)).json()
        node_of = {r["runtime_id"]: front.manager.records[r["runtime_id"]].node_id for r in (ra1, ra2, rb1)}
        # two samples of one image on one node; the other image on the other (least loaded) node
        assert node_of[ra1["runtime_id"]] == node_of[ra2["runtime_id"]] != node_of[rb1["runtime_id"]]
        for sid, r in ((a1, ra1), (a2, ra2), (b1, rb1)):
            ready = wait_pod_status(client, f"{front.url}/sessions/{sid}")
            node = by_id[node_of[r["runtime_id"]]]
            assert ready["url"].startswith(f"http://{node.manager.config.public_host}:")  # the node's address
            assert httpx.get(f"{ready['url']}/alive", timeout=5).status_code == 200
            assert f"imagefarm-rt-{r['runtime_id']}" in our_containers(_node_settings(node), node.manager.server_id)
        # full: both nodes hold 2 / 1 live runtimes of 2 slots; one more fits, the next is 429
        c1 = client.post(f"{front.url}/start", json=sdk_start_body(prebuilt["busybox_base"], _sid()))
        assert c1.status_code == 200
        full = client.post(f"{front.url}/start", json=sdk_start_body(prebuilt["busybox_base"], _sid()))
        assert full.status_code == 429 and full.headers.get("Retry-After") and "every node" in full.json()["detail"]
        rows = client.get(f"{front.url}/nodes").json()
        assert sorted(r["node_id"] for r in rows) == sorted(by_id) and all(r["free_slots"] == 0 for r in rows)
        assert httpx.get(f"{front.url}/metrics").status_code == 401
        metrics = client.get(f"{front.url}/metrics").text
        assert "imagefarm_runtime_free_slots{" in metrics and "imagefarm_runtime_start_to_ready_seconds_count 3.0" in metrics
        # pause / resume / stop go to the node
        assert client.post(f"{front.url}/pause", json={"runtime_id": ra1["runtime_id"]}).json()["status"] == "paused"
        assert client.post(f"{front.url}/resume", json={"runtime_id": ra1["runtime_id"]}).json()["status"] == "running"
        wait_pod_status(client, f"{front.url}/sessions/{a1}")
        assert client.post(f"{front.url}/stop", json={"runtime_id": rb1["runtime_id"]}).status_code == 200
        node_b = by_id[node_of[rb1["runtime_id"]]]
        assert f"imagefarm-rt-{rb1['runtime_id']}" not in our_containers(_node_settings(node_b))
        assert client.get(f"{front.url}/sessions/{b1}").status_code == 404
        # nodes' own APIs refuse the clients' key: only the front reaches them
        assert httpx.post(f"{nodes[0].url}/node/start", json={}, headers={"X-API-Key": API_KEY}).status_code == 401
        assert httpx.post(f"{front.url}/fleet/report", json={}, headers={"X-API-Key": API_KEY}).status_code == 401
        assert httpx.post(f"{front.url}/fleet/report", json={}, headers={"X-API-Key": FLEET_KEY}).status_code == 422


def test_restarted_front_finds_its_nodes_and_runtimes_again(fleet_factory, client, prebuilt):
    with fleet_factory(nodes=2, slots=2) as running:
        sid = _sid()
        started = client.post(f"{running.front.url}/start", json=sdk_start_body(prebuilt["busybox_base"], sid)).json()
        wait_pod_status(client, f"{running.front.url}/sessions/{sid}")
        front = running.restart_front()  # a new process's worth of state: sqlite only
        assert front.manager is not None and front.manager.records.session(sid) is not None
        deadline = time.monotonic() + 30
        while not all(n.state == "up" and n.last_seen for n in front.manager.nodes.values()) or \
                len(front.manager.nodes) != 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        again = wait_pod_status(client, f"{front.url}/sessions/{sid}")
        assert again["runtime_id"] == started["runtime_id"] and again["url"] == started["url"]
        assert again["session_api_key"] == started["session_api_key"]
        assert httpx.get(f"{started['url']}/alive", timeout=5).status_code == 200
        # and it still places: the next sample of that image follows it
        nxt = client.post(f"{front.url}/start", json=sdk_start_body(prebuilt["busybox_base"], _sid())).json()
        assert front.manager.records[nxt["runtime_id"]].node_id == front.manager.records[started["runtime_id"]].node_id


def test_node_cli_bad_input_is_one_line(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "imagefarm")
    env = dict(os.environ, IMAGEFARM_STATE_DIR=str(tmp_path / "st"))
    env.pop("IMAGEFARM_FLEET_KEY", None)
    for args, want in ((["node", "--join", "http://127.0.0.1:9"], "fleet key"),
                       (["node", "--join", "ftp://x"], "--join"),
                       (["node", "--join", "http://127.0.0.1:9", "--slots", "0"], "--slots"),
                       (["serve", "--fleet", "--api-key", "k" * 20], "fleet key"),
                       (["serve", "--placement", "best", "--api-key", "k" * 20], "--placement")):
        r = subprocess.run([exe, "runtime", *args], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and want in r.stdout + r.stderr, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stdout + r.stderr


def test_a_node_speaks_only_for_itself_and_only_from_its_own_address(fleet_factory):
    """Every node holds the fleet key, but a report or leave for a node's id needs the
    token that node got when it joined (403 without it), and a reported URL must be on
    the address the report comes from: the front never calls a URL on another host."""
    import http.server
    import threading

    called: list[str] = []

    class Trap(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            called.append(self.path)
            self.send_response(200)
            self.end_headers()

        do_POST = do_GET

    trap = http.server.ThreadingHTTPServer(("127.0.0.9", 0), Trap)
    threading.Thread(target=trap.serve_forever, daemon=True).start()
    with fleet_factory(nodes=1, slots=1) as running:
        front = running.front
        (first,) = front.manager.nodes.values()
        assert first.token_hash  # it got its token when it joined
        body = {"node_id": first.node_id, "boot": "impostor", "url": first.url, "address": first.address,
                "slots": 100000, "images": [], "runtimes": []}
        # a second node process on the same host and address, holding the fleet key
        with httpx.Client(transport=httpx.HTTPTransport(local_address=first.address), trust_env=False,
                          headers={"X-API-Key": FLEET_KEY}, timeout=10) as impostor:
            r = impostor.post(f"{front.url}/fleet/report", json=body)
            assert r.status_code == 403 and "own id" in r.json()["detail"], r.text
            assert impostor.post(f"{front.url}/fleet/report", json=body,
                                 headers={"X-Node-Token": "guess"}).status_code == 403
            assert impostor.post(f"{front.url}/fleet/leave", json={"node_id": first.node_id}).status_code == 403
        node = front.manager.nodes[first.node_id]
        assert node.boot != "impostor" and node.slots == 1 and node.state == "up"  # nothing taken over
        # a new node id whose URL is on another host than the one it reports from: refused
        away = f"http://127.0.0.9:{trap.server_address[1]}"
        evil = {**body, "node_id": "evil", "url": away, "address": "127.0.0.9"}
        with httpx.Client(trust_env=False, headers={"X-API-Key": FLEET_KEY}, timeout=10) as c:
            r = c.post(f"{front.url}/fleet/report", json=evil)
        assert r.status_code == 403 and "127.0.0.9" in r.json()["detail"], r.text
        assert "evil" not in front.manager.nodes
        time.sleep(2)  # four heartbeats: the front calls only the nodes it admitted
        assert called == []
    trap.shutdown()
    trap.server_close()


def test_a_fleet_key_equal_to_the_client_api_key_is_refused(rt_settings):
    from imagefarm.errors import ConfigError
    from imagefarm.runtime import ServeConfig
    from imagefarm.runtime.fleet import FrontOptions
    from imagefarm.runtime.serve import build_server

    with pytest.raises(ConfigError, match="fleet key is the clients' API key"):
        build_server(rt_settings, ServeConfig(api_key=FLEET_KEY), front=FrontOptions(fleet_key=FLEET_KEY))
