"""Starts that use foresight: payloads pulled at join, warm sandboxes handed to starts.

Counted from records, not inferred: the registry's access log (what a node fetched and
when), podman's own container list (how many agent servers run), the server's
``/metrics`` (hits and misses).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import pytest

from rtkit import API_KEY, our_containers, sdk_start_body, wait_pod_status


def _sid(p: str) -> str:
    return f"{p}-{uuid.uuid4().hex[:10]}"


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def _wait_warm(client, url: str, image: str, n: int, *, timeout: float = 120, manager=None, seen=None,
               settings=None, server_id: str = "") -> dict:
    """Poll /nodes until ``n`` warm sandboxes of ``image`` run (and, given the manager, are
    ready); with ``seen``, podman's own count of this server's containers at each poll."""
    deadline = time.monotonic() + timeout
    while True:
        row = client.get(f"{url}/nodes").json()[0]
        if seen is not None:
            seen.append(len(our_containers(settings, server_id)))
        ok = row["warm"].get(image, 0) == n
        if ok and manager is not None:
            ok = all(r.pod_status == "ready" for r in manager.warm.warm_records())
        if ok:
            return row
        assert time.monotonic() < deadline, f"no {n} warm sandbox(es) of {image}: {row}"
        time.sleep(0.1)


def test_a_node_pulls_the_payload_before_any_start_and_a_new_image_then_fetches_no_payload_blob(
        fleet_factory, client, prebuilt, registry):
    mark = registry.mark()
    with fleet_factory(nodes=1, slots=2, node_timeout=10) as fl:  # returns once the node reports ready
        joined = [a for a in registry.accesses(mark) if a.method == "GET" and "/blobs/" in a.path]
        assert [a.status for a in joined if prebuilt["payload_layer"] in a.path] == [200]
        row = client.get(f"{fl.front.url}/nodes").json()[0]
        assert row["ready"] is True
        assert [(p["present"], p["image"].split("@")[0]) for p in row["payloads"]] == \
            [(True, prebuilt["payload_image"].name)]
        mark = registry.mark()
        sid = _sid("pl")
        r = client.post(f"{fl.front.url}/start", json=sdk_start_body(prebuilt["r2e_base"], sid))
        assert r.status_code == 200, r.text
        wait_pod_status(client, f"{fl.front.url}/sessions/{sid}")
        gets = [a.path for a in registry.accesses(mark) if a.method == "GET" and "/blobs/" in a.path]
        assert gets, "the image's own layers were pulled"
        assert not [p for p in gets if prebuilt["payload_layer"] in p]  # the payload's layer was there

        # the front forwards warm sandboxes to the node placement picks, and places the start there
        pinned = f"{prebuilt['busybox'].image.rsplit(':', 1)[0]}@{prebuilt['busybox'].digest}"
        r = client.post(f"{fl.front.url}/prefetch", json={"images": [prebuilt["busybox_base"]], "warm": 1})
        assert r.status_code == 200 and r.json()["images"][0]["warm"] == 1, r.text
        deadline = time.monotonic() + 60
        while client.get(f"{fl.front.url}/nodes").json()[0]["warm"] != {pinned: 1}:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        hit = client.post(f"{fl.front.url}/start", json=sdk_start_body(prebuilt["busybox_base"], _sid("fw"))).json()
        wait_pod_status(client, f"{fl.front.url}/sessions/{hit['session_id']}")
        text = client.get(f"{fl.front.url}/metrics").text
        assert _metric(text, "imagefarm_runtime_warm_hits_total") == 1
        assert _metric(text, "imagefarm_runtime_warm_misses_total") == 1


def test_warm_sandboxes_are_handed_to_matching_starts_hold_slots_and_yield_them(
        server_factory, client, prebuilt, rt_settings):
    with server_factory(max_runtimes=2) as srv:
        sid = srv.manager.server_id
        pinned = f"{prebuilt['r2e'].image.rsplit(':', 1)[0]}@{prebuilt['r2e'].digest}"
        r = client.post(f"{srv.url}/prefetch", json={"images": [prebuilt["r2e_base"]], "warm": 3})
        assert r.status_code == 200, r.text
        (row,) = r.json()["images"]
        assert row["prebuilt_image"] == pinned and row["warm"] == 3
        seen: list[int] = []
        _wait_warm(client, srv.url, pinned, 2, manager=srv.manager, seen=seen, settings=rt_settings, server_id=sid)
        time.sleep(1.5)  # the pool had time to try a third: the slots said no
        assert client.get(f"{srv.url}/nodes").json()[0]["warm"] == {pinned: 2}
        assert len(our_containers(rt_settings, sid)) == 2 and max(seen) <= 2
        warm_ids = {r.runtime_id for r in srv.manager.warm.warm_records()}
        assert client.get(f"{srv.url}/list").json()["runtimes"] == []  # the clients see none of them

        # a start of that shape: handed one at once, ready in the answer
        s1 = _sid("hit")
        started = client.post(f"{srv.url}/start", json=sdk_start_body(prebuilt["r2e_base"], s1)).json()
        assert started["pod_status"] == "ready" and started["runtime_id"] in warm_ids
        assert httpx.get(f"{started['url']}/alive").status_code == 200
        assert client.get(f"{srv.url}/sessions/{s1}").json()["session_api_key"] == started["session_api_key"]

        # another image: no match; it takes the last warm sandbox's slot, never a third container
        s2 = _sid("miss")
        other = client.post(f"{srv.url}/start", json=sdk_start_body(prebuilt["busybox_base"], s2)).json()
        assert other["pod_status"] == "pending" and other["runtime_id"] not in warm_ids
        deadline = time.monotonic() + 60
        while client.get(f"{srv.url}/sessions/{s2}").json()["pod_status"] != "ready":
            seen.append(len(our_containers(rt_settings, sid)))
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert max(seen) <= 2 and len(our_containers(rt_settings, sid)) == 2
        row = client.get(f"{srv.url}/nodes").json()[0]
        assert row["warm"] == {} and row["stats"]["warm_yielded"] == 1
        text = client.get(f"{srv.url}/metrics").text
        assert _metric(text, "imagefarm_runtime_warm_hits_total") == 1
        assert _metric(text, "imagefarm_runtime_warm_misses_total") == 1

        # the pool refills once a slot is free again
        client.post(f"{srv.url}/stop", json={"runtime_id": other["runtime_id"]})
        _wait_warm(client, srv.url, pinned, 1, seen=seen, settings=rt_settings, server_id=sid)
        assert max(seen) <= 2

        # recipe and version reach /image_exists: this base has no v0 image
        ie = client.get(f"{srv.url}/image_exists", params={"image": prebuilt["r2e_base"], "recipe": "v0"}).json()
        assert ie["exists"] is False and "recipe v0" in ie["detail"]
        bad = client.get(f"{srv.url}/image_exists", params={"image": prebuilt["r2e_base"],
                                                             "agent_server_version": "not-a-version"})
        assert bad.status_code == 422
        # warm 0: none kept for the image any more
        assert client.post(f"{srv.url}/prefetch", json={"images": [prebuilt["r2e_base"]], "warm": 0}).json() \
            ["images"][0]["warm"] == 0
        _wait_warm(client, srv.url, pinned, 0)
        deadline = time.monotonic() + 60
        hit_container = srv.manager.get(started["runtime_id"]).container  # the client's runtime stays
        while our_containers(rt_settings, sid) != [hit_container]:  # the warm one goes right after its record
            assert time.monotonic() < deadline
            time.sleep(0.2)


@pytest.mark.timeout(900)
def test_real_sdk_client_is_handed_a_warm_sandbox_and_runs_in_testbed(server_factory, client, sdk_image,
                                                                        sdk_python, rt_settings):
    """openhands-workspace's own APIRemoteWorkspace, on the real agent server: the trainer
    prefetched one warm sandbox; the client's start is handed it and runs in /testbed,
    then pauses, resumes and stops it (the stand-in SDK test this replaces did only those)."""
    base, derived = sdk_image
    pinned = f"{derived.image.rsplit(':', 1)[0]}@{derived.digest}"
    with server_factory(memory_mib_per_factor=2048) as srv:
        r = client.post(f"{srv.url}/prefetch", json={"images": [base], "warm": 1})
        assert r.status_code == 200 and r.json()["images"][0]["warm"] == 1, r.text
        _wait_warm(client, srv.url, pinned, 1, manager=srv.manager, timeout=300)
        (warm,) = srv.manager.warm.warm_records()
        proc = sdk_python.run(Path(__file__).with_name("sdk_client.py"), srv.url, API_KEY, base, "--exec",
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        steps = {s["step"]: s for s in (json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{"))}
        assert steps["ready"]["runtime_id"] == warm.runtime_id
        assert steps["exec"]["exit_code"] == 0 and "from-sdk" in steps["exec"]["stdout"]
        assert "/testbed/.venv" in steps["exec"]["stdout"]
        assert _metric(client.get(f"{srv.url}/metrics").text, "imagefarm_runtime_warm_hits_total") == 1
        # the rest of the client's life as before: pause, resume, stop (cleanup)
        assert steps["resumed"]["alive"] is True and steps["stopped"]["runtime_id"] == warm.runtime_id
        assert srv.manager.runtimes() == []
        assert set(our_containers(rt_settings, srv.manager.server_id)) == {r.container for r in srv.manager.warm.warm_records()}
