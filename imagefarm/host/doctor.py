"""Check each system part imagefarm needs and say how to fix what is missing."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

from .containers import INSTALL_HINT, run, which
from imagefarm.errors import ImagefarmError
from imagefarm.names.reference import parse
from imagefarm.settings import Settings


@dataclass(frozen=True)
class Check:
    part: str
    ok: bool
    detail: str
    fix: str = ""


def _tool(name: str, version_args: list[str]) -> Check:
    path = shutil.which(name)
    if not path:
        return Check(name, False, "not found on PATH", INSTALL_HINT.get(name, f"install {name}"))
    proc = subprocess.run([path, *version_args], capture_output=True, text=True)
    first = (proc.stdout or proc.stderr).strip().splitlines()[:1]
    return Check(name, proc.returncode == 0, first[0] if first else path,
                 "" if proc.returncode == 0 else f"`{name} {' '.join(version_args)}` fails: reinstall it")


def _podman_runs(settings: Settings) -> Check:
    """Really start a container (from a busybox rootfs) with the project's config."""
    from .rootfs import busybox_binary

    try:
        which("podman")
        which("runc")
        busybox = busybox_binary(settings.cache_dir)
    except ImagefarmError as exc:
        return Check("podman run", False, str(exc), "scripts/setup")
    with tempfile.TemporaryDirectory(prefix="imagefarm-doctor-") as tmp:
        root = Path(tmp)
        (root / "bin").mkdir()
        shutil.copy2(busybox, root / "bin" / "busybox")
        try:
            proc = run(settings, ["podman", "run", "--rm", "--network", "none", "--rootfs", str(root),
                                  "/bin/busybox", "echo", "container-ok"], check=False, timeout=120)
        except ImagefarmError as exc:
            return Check("podman run", False, str(exc), "scripts/setup")
    ok = proc.returncode == 0 and "container-ok" in proc.stdout
    detail = "started a container with runc" if ok else (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return Check("podman run", ok, detail, "" if ok else "check runc is installed: apt-get install -y runc")


def _registry(settings: Settings) -> Check:
    ref = parse(settings.to + ("/probe:probe" if "/" not in settings.to else ":probe"))
    scheme = "http" if ref.is_loopback or ref.registry in settings.insecure_registries else "https"
    url = f"{scheme}://{ref.api_host}/v2/"
    try:
        r = httpx.get(url, timeout=3)
    except httpx.HTTPError as exc:
        fix = "imagefarm dev up" if ref.is_loopback else f"check the network path to {ref.registry}"
        return Check("registry", False, f"{url} unreachable ({exc.__class__.__name__})", fix)
    ok = r.status_code in (200, 401)
    return Check("registry", ok, f"{url} answered {r.status_code}", "" if ok else "is this an OCI registry?")


def _redis(settings: Settings) -> Check:
    u = urlparse(settings.broker_url)
    host, port = u.hostname or "127.0.0.1", u.port or 6379
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
    except OSError as exc:
        fix = "imagefarm dev up" if host in ("127.0.0.1", "localhost") else f"start Redis at {host}:{port}"
        return Check("redis", False, f"{host}:{port} unreachable ({exc.strerror or exc})", fix)
    ok = reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")
    return Check("redis", ok, f"{host}:{port} answered {reply[:20]!r}", "" if ok else "is this Redis?")


def run_checks(settings: Settings, services: bool = True) -> list[Check]:
    checks = [
        _tool("buildah", ["--version"]),
        _tool("podman", ["--version"]),
        _tool("runc", ["--version"]),
        _tool("skopeo", ["--version"]),
        _tool("debootstrap", ["--version"]),
        _podman_runs(settings),
    ]
    if services:
        checks += [_registry(settings), _redis(settings)]
    return checks
