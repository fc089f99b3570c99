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
    with fleet_factory(nodes=2, slots=2) as (front, nodes):
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
