"""The fleet's front SIGKILLed mid-run and started again as a new process: written
against the CLI and HTTP surface only (``imagefarm runtime serve --fleet``,
``imagefarm runtime node --join``), so it holds whatever shape runtime/ takes inside.

What is judged: the node and the running runtime are found again by the new process
(``/nodes``, ``/sessions``), the runtime's URL answers, and the trainer's next calls
(a ``/start`` that becomes ready, ``/stop``s) work; the node's own podman storage then
holds no runtime container. The in-process variant (tests/runtime/test_fleet.py) stops
the front cleanly in the same process; this one runs no shutdown code at all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.reliability.conftest import wait_for
from tests.runtime.rtkit import API_KEY, CliServer, our_containers, sdk_start_body, wait_pod_status

IMAGEFARM = str(Path(sys.executable).parent / "imagefarm")
NODE_TIMEOUT = 3.0


def _sid() -> str:
    return f"agent-server-{uuid.uuid4()}"


@pytest.fixture
def node_proc(rt_settings, tmp_path):
    """``node_proc(front_url, key_file) -> (Popen, settings)``: one node as SLURM's srun starts it."""
    made = []

    def start(front_url: str, key_file: Path):
        st = rt_settings.model_copy(update={"state_dir": tmp_path / "node1"})
        env = {k: v for k, v in os.environ.items() if k != "IMAGEFARM_RUNTIME_API_KEY"}
        env.update(IMAGEFARM_STATE_DIR=str(st.state_dir), IMAGEFARM_CACHE_DIR=str(st.cache_dir),
                   IMAGEFARM_TO=st.to)
        lo = 20000 + (os.getpid() * 11) % 20000
        proc = subprocess.Popen([IMAGEFARM, "runtime", "node", "--join", front_url, "--fleet-key-file", str(key_file),
                                 "--host", "127.0.1.1", "--advertise", "127.0.1.1", "--port", "0", "--slots", "2",
                                 "--heartbeat", "0.5", "--port-range", f"{lo}-{lo + 49}"],
                                env=env, stdout=open(tmp_path / "node.log", "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        made.append(proc)
        return proc, st

    yield start
    for p in made:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(60)


def test_front_sigkilled_and_started_again_finds_its_fleet(rt_settings, prebuilt, node_proc, tmp_path):
    key_file = tmp_path / "fleet.key"
    key_file.write_text("fleet-restart-test-key-0f3d9a71\n")
    key_file.chmod(0o600)
    front_st = rt_settings.model_copy(update={"state_dir": tmp_path / "front"})
    front = CliServer(front_st, front_st.state_dir / "runtime", "45000-45049", tmp_path,
                      ["--fleet", "--fleet-key-file", str(key_file), "--node-timeout", f"{NODE_TIMEOUT:g}"])
    url = front.start()
    node, node_st = node_proc(url, key_file)
    with httpx.Client(headers={"X-API-Key": API_KEY}, timeout=60) as c:
        try:
            wait_for(lambda: [n for n in c.get(f"{url}/nodes").json() if n["ready"] and n["state"] == "up"],
                     "the node to join", timeout=120)
            sid = _sid()
            r = c.post(f"{url}/start", json=sdk_start_body(prebuilt["busybox_base"], sid))
            assert r.status_code == 200, r.text
            started = r.json()
            wait_pod_status(c, f"{url}/sessions/{sid}", timeout=120)
            old_pid = front.proc.pid
            front.kill()  # SIGKILL: no shutdown code runs
            assert node.poll() is None
            assert f"imagefarm-rt-{started['runtime_id']}" in our_containers(node_st)
            assert front.start() == url and front.proc.pid != old_pid  # a new process, same port and state
            # the node is found again, up, by the new process
            nodes = wait_for(lambda: [n for n in c.get(f"{url}/nodes").json() if n["state"] == "up" and n["ready"]],
                             "the node to be up again at the new front", timeout=60)
            assert [n["address"] for n in nodes] == ["127.0.1.1"], nodes
            again = wait_pod_status(c, f"{url}/sessions/{sid}", timeout=60)
            assert again["pod_status"] == "ready", again
            assert again["runtime_id"] == started["runtime_id"] and again["url"] == started["url"]
            assert again["session_api_key"] == started["session_api_key"]
            assert httpx.get(f"{started['url']}/alive", timeout=10).status_code == 200
            listed = [x["runtime_id"] for x in c.get(f"{url}/list").json()["runtimes"]]
            assert listed == [started["runtime_id"]], listed
            # the trainer's next calls work: a start that becomes ready, then stops
            sid2 = _sid()
            r = c.post(f"{url}/start", json=sdk_start_body(prebuilt["busybox_base"], sid2))
            assert r.status_code == 200, r.text
            nxt = r.json()
            assert wait_pod_status(c, f"{url}/sessions/{sid2}", timeout=120)["pod_status"] == "ready"
            assert httpx.get(f"{nxt['url']}/alive", timeout=10).status_code == 200
            for rid in (started["runtime_id"], nxt["runtime_id"]):
                assert c.post(f"{url}/stop", json={"runtime_id": rid}).status_code == 200
            wait_for(lambda: our_containers(node_st) == [], "the node to remove both runtimes", timeout=60)
        except BaseException:
            print(front.output()[-4000:], (tmp_path / "node.log").read_text()[-4000:])
            raise
        finally:
            front.kill(signal.SIGTERM)
