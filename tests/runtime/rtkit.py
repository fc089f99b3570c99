"""Helpers of the runtime tests: the stand-in agent server, client-shaped requests, polling."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

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
                     "--url-file", str(self.url_file), *extra]
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


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def raw_post(url: str, path: str, headers: dict[str, str], length: int, push: int = 0) -> tuple[bytes, int]:
    """POST with ``Content-Length: length`` and no body yet; read the answer, then push up
    to ``push`` body bytes as an attacker would. Returns (status line, bytes pushed)."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {length}\r\n{head}\r\n".encode())
        answer = s.recv(65536)  # the answer comes before a single body byte was sent
        pushed, chunk = 0, b"\0" * (1 << 20)
        try:
            while pushed < push:
                s.sendall(chunk)
                pushed += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
    return answer.split(b"\r\n", 1)[0], pushed


def chunked_post(url: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """A chunked POST; the answer is read by a thread while the body is still going out
    (a server that refuses mid-body closes at once, and the rest of the body is lost)."""
    u = urlsplit(url)
    got: list[bytes] = []
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        reader = threading.Thread(target=lambda: got.append(s.recv(65536)), daemon=True)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                  f"Transfer-Encoding: chunked\r\n{head}\r\n".encode())
        reader.start()
        try:
            for i in range(0, len(body), 1 << 16):
                part = body[i:i + (1 << 16)]
                s.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        reader.join(30)
    return got[0].split(b"\r\n", 1)[0] if got else b"(no answer)"


def route_table(routes, prefix: str = ""):
    """(path, methods) of every route of an app, included routers flattened (FastAPI
    >= 0.16x keeps an included router as one entry of ``app.routes``)."""
    for r in routes:
        inner = getattr(r, "original_router", None)
        if inner is not None:
            yield from route_table(inner.routes, prefix + r.include_context.prefix)
        else:
            yield prefix + r.path, sorted(set(getattr(r, "methods", None) or {"GET"}) - {"HEAD"})
