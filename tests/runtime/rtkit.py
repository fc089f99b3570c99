"""Helpers of the runtime tests: the stand-in agent server, client-shaped requests, polling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from imagefarm.host.containers import run
from imagefarm.host.services import free_port

API_KEY = "runtime-test-key-7b1f0c"

STANDIN_AGENT_SERVER = b"""#!/usr/local/bin/busybox sh
# STAND-IN for openhands-agent-server, for imagefarm's runtime tests only.
# Serves /alive and /health with busybox httpd; binds 0.0.0.0 only when SESSION_API_KEY
# is set, like the real server. STANDIN_CRASH=<text> prints lines and exits 3.
# the port: --port N / --port=N (agent server), else the first number (V0 action execution server)
PORT=
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT="$2"; shift 2 ;;
    --port=*) PORT="${1#--port=}"; shift ;;
    *[!0-9]*|"") shift ;;
    *) [ -z "$PORT" ] && PORT="$1"; shift ;;
  esac
done
PORT="${PORT:-8000}"
echo "stand-in agent server: port $PORT, uid $(/usr/local/bin/busybox id -u), cwd $(pwd)"
if [ -n "$STANDIN_CRASH" ]; then
  echo "stand-in: starting up"
  echo "stand-in: fatal: $STANDIN_CRASH" >&2
  exit 3
fi
if [ -n "$STANDIN_DELAY" ]; then /usr/local/bin/busybox sleep "$STANDIN_DELAY"; fi
BIND=127.0.0.1:
if [ -n "$SESSION_API_KEY" ]; then BIND=; fi
exec /usr/local/bin/busybox httpd -f -p "${BIND}${PORT}" -h /opt/standin-www
"""


def sdk_start_body(image: str, session_id: str, **extra) -> dict:
    """Exactly what APIRemoteWorkspace._start_runtime sends (openhands-workspace 1.58)."""
    body = {
        "image": image,
        "command": "/usr/local/bin/openhands-agent-server --port 60000",
        "working_dir": "/",
        "environment": {},
        "session_id": session_id,
        "run_as_user": 10001,
        "fs_group": 10001,
        "image_pull_policy": "IfNotPresent",
        "runtime_class": "sysbox-runc",
    }
    body.update(extra)
    return body


def wait_pod_status(client: httpx.Client, url: str, want=("ready",), timeout: float = 60.0,
                    interval: float = 0.05) -> dict:
    """Poll a session/runtime URL until pod_status is one of ``want`` (or terminal)."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        r = client.get(url)
        assert r.status_code == 200, r.text
        data = r.json()
        if not seen or seen[-1] != data["pod_status"]:
            seen.append(data["pod_status"])
        if data["pod_status"] in want:
            data["_seen"] = seen
            return data
        if data["pod_status"] in ("failed", "crashloopbackoff", "unknown") or time.monotonic() > deadline:
            raise AssertionError(f"pod_status {data['pod_status']} (seen {seen}): {data}")
        time.sleep(interval)


def our_containers(settings, server_id: str | None = None) -> list[str]:
    label = f"imagefarm.runtime.server={server_id}" if server_id else "imagefarm.runtime=1"
    out = run(settings, ["podman", "ps", "--all", "--filter", f"label={label}", "--format", "{{.Names}}"]).stdout
    return [n for n in out.split() if n]


class CliServer:
    """``imagefarm runtime serve`` as a subprocess (restart and crash tests)."""

    def __init__(self, settings, state_root: Path, port_range: str, tmp: Path, extra=()) -> None:
        self.settings, self.tmp = settings, tmp
        self.port = free_port()
        self.url_file = tmp / "runtime-url"
        self.env = dict(os.environ, IMAGEFARM_STATE_DIR=str(settings.state_dir),
                        IMAGEFARM_CACHE_DIR=str(settings.cache_dir), IMAGEFARM_TO=settings.to,
                        IMAGEFARM_RUNTIME_API_KEY=API_KEY)
        exe = str(Path(sys.executable).parent / "imagefarm")
        self.argv = [exe, "runtime", "serve", "--port", str(self.port), "--port-range", port_range,
                     "--resolver", "registry", "--url-file", str(self.url_file), *extra]
        self.state_root = state_root
        self.proc: subprocess.Popen | None = None
        self.log = tmp / "server.log"

    def start(self) -> str:
        self.url_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not self.url_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        return self.url_file.read_text().strip()

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(30)

    def output(self) -> str:
        return self.log.read_text()


