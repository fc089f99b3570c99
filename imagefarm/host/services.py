"""Start real services on free loopback ports, and stop them, leaving nothing behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

from .containers import which
from imagefarm.errors import ToolError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None, what: str = "service") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ToolError(f"{what} exited at start (code {proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ToolError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


@dataclass
class _Service:
    workdir: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    _own_dir: bool = field(default=False, repr=False)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port and data (fault tests)."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL, as a crash does: no shutdown of any kind (fault tests; ``start()`` again)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def start(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: one line of the registry's access log (Apache combined format)
_ACCESS_LINE = re.compile(r'^(\S+) \S+ \S+ \[([^\]]+)\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-) "[^"]*" "([^"]*)"')


@dataclass(frozen=True)
class Access:
    """One request as the registry logged it (after it answered)."""

    method: str
    path: str
    status: int
    size: int | None  #: response bytes
    agent: str
    when: float       #: epoch seconds (the log has whole seconds)


def read_access_log(path: Path, mark: int = 0) -> list[Access]:
    """The requests logged in ``path`` from byte offset ``mark`` on; other lines skipped."""
    try:
        with open(path, "rb") as fh:
            fh.seek(mark)
            text = fh.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        m = _ACCESS_LINE.match(line)
        if m:
            _ip, when, method, path_, status, size, agent = m.groups()
            out.append(Access(method, path_, int(status), None if size == "-" else int(size), agent,
                              datetime.strptime(when, "%d/%b/%Y:%H:%M:%S %z").timestamp()))
    return out


@dataclass
class Registry(_Service):
    """Debian's docker-registry (CNCF distribution) on 127.0.0.1:<free port>.

    With ``users`` it requires htpasswd basic auth. With ``proxy`` (a registry URL) it
    is a pull-through cache of that registry (distribution's ``proxy: remoteurl:``):
    read-only, each blob and manifest fetched from the remote once, then served locally.
    With ``access_log`` every request is logged to ``registry.log`` (kept across
    restarts): what fault tests and benchmarks count instead of inferring.
    """

    users: dict[str, str] | None = None
    proxy: str | None = None
    access_log: bool = False

    @classmethod
    def create(cls, workdir: Path | None = None, users: dict[str, str] | None = None,
               access_log: bool = False) -> "Registry":
        own = workdir is None
        wd = Path(workdir or tempfile.mkdtemp(prefix="imagefarm-registry-"))
        return cls(workdir=wd, users=users, access_log=access_log, _own_dir=own)

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    def mark(self) -> int:
        """The access log's current end: pass it to ``accesses`` to read what follows."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def accesses(self, mark: int = 0) -> list[Access]:
        return read_access_log(self.log_path, mark)

    def requests(self, agent: str = "") -> list[str]:
        """``METHOD PATH`` (percent-decoded) of every request logged; with ``agent``, only
        those whose User-Agent contains it."""
        return [f"{a.method} {urllib.parse.unquote(a.path)}" for a in self.accesses() if agent in a.agent]

    def blob_gets(self) -> list[str]:
        """The blob digests served so far (GETs answered 200 or 307): what pulls really fetched."""
        return [a.path.rsplit("/", 1)[1] for a in self.accesses()
                if a.method == "GET" and "/blobs/sha256:" in a.path and a.status in (200, 307)]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def _config(self) -> Path:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        lines = [
            "version: 0.1",
            "log:",
            "  level: error",
            "  accesslog:",
            f"    disabled: {'false' if self.access_log else 'true'}",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {data}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            "  secret: imagefarm-test-secret",
        ]
        if self.users:
            htpasswd = self.workdir / "htpasswd"
            htpasswd.unlink(missing_ok=True)
            for user, password in self.users.items():
                subprocess.run(
                    [which("htpasswd"), "-Bb", *(["-c"] if not htpasswd.exists() else []),
                     str(htpasswd), user, password],
                    check=True, capture_output=True,
                )
            lines += ["auth:", "  htpasswd:", "    realm: imagefarm", f"    path: {htpasswd}"]
        if self.proxy:
            lines += ["proxy:", f"  remoteurl: {self.proxy}"]
        cfg = self.workdir / "config.yml"
        cfg.write_text("\n".join(lines) + "\n")
        return cfg

    def start(self) -> None:
        if not self.port:
            self.port = free_port()
        cfg = self._config()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [which("docker-registry"), "serve", str(cfg)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_port(self.port, proc=self.proc, what="docker-registry")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{self.url}/v2/", timeout=1)
                if r.status_code in (200, 401):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise ToolError("docker-registry did not answer /v2/")


@dataclass
class Redis(_Service):
    """redis-server on 127.0.0.1:<free port>, data in a private directory (also the
    ``dev`` stack's Redis).

    ``appendonly yes`` with ``appendfsync always``: a queued task or a stored result that
    Redis acknowledged is on disk, so a SIGKILL loses nothing; Redis groups the writes of
    one event-loop turn into one fsync, cheap at the farm's rates. (``everysec`` could
    lose the last second: a task the driver believes queued, a result a worker stored.)
    """

    #: with a password: the ACL user the farm connects as (the default user is off)
    password: str | None = field(default=None, repr=False)
    user: str = "farm"

    @classmethod
    def create(cls, workdir: Path | None = None, password: str | None = None) -> "Redis":
        own = workdir is None
        wd = Path(workdir or tempfile.mkdtemp(prefix="imagefarm-redis-"))
        return cls(workdir=wd, _own_dir=own, password=password)

    @property
    def url(self) -> str:
        auth = f"{self.user}:{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start redis-server; its settings (the ACL user's password included) go in a
        0600 config file, never on its command line."""
        if not self.port:
            self.port = free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "redis.conf"
        lines = [f"port {self.port}", "bind 127.0.0.1", f'dir "{self.workdir}"', 'save ""', "appendonly yes",
                 "appendfsync always", "protected-mode yes"]
        if self.password:
            lines += ["user default off", f"user {self.user} on >{self.password} ~* &* +@all"]
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        os.chmod(conf, 0o600)
        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen([which("redis-server"), str(conf)],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.port, proc=self.proc, what="redis-server")
        hello = f"AUTH {self.user} {self.password}\r\n".encode() if self.password else b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(hello + b"PING\r\n")
                    got = b""
                    while b"PONG" not in got and len(got) < 256:
                        chunk = s.recv(64)
                        if not chunk:
                            break
                        got += chunk
                    if b"+PONG" in got:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise ToolError("redis-server did not answer PING")
