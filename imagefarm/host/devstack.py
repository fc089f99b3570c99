"""The embedded default: a local registry and Redis for one machine.

``imagefarm dev up`` starts Debian's docker-registry and redis-server as background
processes under the state directory (pid files, logs, data kept across restarts), on
the ports the default settings point at; ``imagefarm dev down`` stops them. Redis gets
a generated password (an ACL user ``farm``; the default user is off), kept 0600 in
``state_dir/dev/redis.password``, where every command on this machine finds it.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from imagefarm.errors import ConfigError
from imagefarm.names.reference import Prefix
from .proc import pid_alive
from imagefarm.settings import Settings, dev_password_file
from .services import Redis, Registry
from .statedir import state_subdir


@dataclass(frozen=True)
class Endpoint:
    name: str
    host: str
    port: int
    pid: int | None  #: 0 when an already running service (not started by us) is used


def _pidfile(settings: Settings, name: str) -> Path:
    return settings.state_dir / "dev" / f"{name}.pid"


def _read_pid(settings: Settings, name: str) -> int | None:
    p = _pidfile(settings, name)
    try:
        pid = int(p.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def registry_port(settings: Settings) -> tuple[str, int]:
    registry = settings.prefix.registry
    if not registry.is_loopback:
        raise ConfigError(f"IMAGEFARM_TO={settings.to!r} is not a local registry; `dev up` only starts local ones")
    host, _, port = registry.rpartition(":")
    return host, int(port or 80)


def remote_url(registry: str) -> str:
    """The API URL of a registry named as in image references (``docker.io``)."""
    return Prefix.parse(registry).registry.base_url()


def up(settings: Settings, mirror: str | None = None, mirror_port: int | None = None) -> list[Endpoint]:
    """Start whatever is not already running; idempotent.

    ``mirror`` (a registry name such as ``docker.io``): also a pull-through cache of it
    on ``mirror_port`` (default: the registry's port + 1), so a team reads each base from
    the public registry once; point ``IMAGEFARM_MIRRORS`` at it."""
    out = []
    base = state_subdir(settings.state_dir, "dev")
    host, port = registry_port(settings)
    out.append(_registry(settings, "registry", host, port, None))
    if mirror:
        out.append(_registry(settings, "mirror", host, mirror_port or port + 1, remote_url(mirror)))

    url = urlparse(settings.broker_url)
    if url.hostname not in ("127.0.0.1", "localhost"):
        raise ConfigError(f"IMAGEFARM_BROKER_URL names host {url.hostname!r}, not this machine; "
                          "`dev up` only starts local Redis")
    rport = url.port or 6379
    password = None if url.password else _password(settings)
    pid = _read_pid(settings, "redis")
    if pid is None and _answers(rport, b"PING\r\n", b"+PONG"):
        pid = 0
    if pid is None:
        redis = Redis(workdir=base / "redis", port=rport, password=password)
        redis.start()
        pid = redis.proc.pid
        _pidfile(settings, "redis").write_text(str(pid))
    out.append(Endpoint("redis", "127.0.0.1", rport, pid))
    return out


def _password(settings: Settings) -> str:
    """The dev Redis password: generated once, kept 0600 in the state directory, where
    the CLI and workers on this machine find it (``Settings.broker``)."""
    path = dev_password_file(settings.state_dir)
    try:
        pw = path.read_text().strip()
        if pw:
            os.chmod(path, 0o600)
            return pw
    except FileNotFoundError:
        pass
    pw = secrets.token_hex(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(pw + "\n")
    return pw


def _registry(settings: Settings, name: str, host: str, port: int, proxy: str | None) -> Endpoint:
    pid = _read_pid(settings, name)
    if pid is None and _answers(port, b"GET /v2/ HTTP/1.0\r\n\r\n", b"HTTP/"):
        pid = 0  # something already serves a registry there: use it
    if pid is None:
        reg = Registry(workdir=settings.state_dir / "dev" / name, port=port, proxy=proxy)
        reg.start()
        pid = reg.proc.pid
        _pidfile(settings, name).write_text(str(pid))
    return Endpoint(name, host, port, pid)


def _answers(port: int, probe: bytes, expect: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(probe)
            return s.recv(64).startswith(expect)
    except OSError:
        return False


def down(settings: Settings) -> list[str]:
    stopped = []
    for name in ("registry", "mirror", "redis"):
        pid = _read_pid(settings, name)
        if pid is not None:
            os.killpg(pid, signal.SIGTERM) if _is_group_leader(pid) else os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            stopped.append(name)
        _pidfile(settings, name).unlink(missing_ok=True)
    return stopped


def _is_group_leader(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except OSError:
        return False
