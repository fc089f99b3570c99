"""Run the app under uvicorn: bind, announce the URL (atomically, to a file), serve.

The listening socket is bound here (so ``--port 0`` works and the URL written to
``url_file`` names the real port), and the URL file is written only once the server
has reconciled its state and accepts requests: a training job that reads the file
can use the URL at once.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from imagefarm.errors import ConfigError
from imagefarm.settings import Settings

from .config import ServeConfig
from .resolver import Resolver

if TYPE_CHECKING:
    from .config import FrontOptions
    from .node import NodeConfig

log = logging.getLogger("imagefarm.runtime")


def default_resolver(settings: Settings) -> Resolver:
    """The one resolver of the project: ``imagefarm.serve.lookup.Lookup``."""
    from imagefarm.serve.lookup import Lookup

    return Lookup(settings)


def write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def advertised_url(host: str, port: int, public_host: str | None = None) -> str:
    if public_host:
        h = public_host
    elif host in ("0.0.0.0", "::", ""):
        h = socket.getfqdn()
    else:
        h = host
    if ":" in h and not h.startswith("["):
        h = f"[{h}]"
    return f"http://{h}:{port}"


def build_server(settings: Settings, config: ServeConfig, *, host: str = "127.0.0.1", port: int = 0,
                 resolver: Resolver | None = None, url_file: Path | None = None,
                 public_host: str | None = None, log_level: str = "info",
                 on_ready: Callable[[str], None] | None = None,
                 front: "FrontOptions | None" = None, node: "NodeConfig | None" = None):
    """A ``uvicorn.Server`` (not yet running), its bound socket and its URL.

    By default the server is its own only node. ``front``: a fleet's front (runtimes on
    the nodes that join it); ``node``: a node process joining ``node.join``."""
    import uvicorn

    from .app import create_app
    from .backend import PodmanBackend
    from .manager import RuntimeManager

    if front is not None and config.api_key and secrets.compare_digest(front.fleet_key, config.api_key):
        raise ConfigError("the fleet key is the clients' API key: a trainer holding it could report as a node; "
                          "give the fleet its own key (--fleet-key-file / IMAGEFARM_FLEET_KEY)")
    sock = bind(host, port)
    url = advertised_url(host, sock.getsockname()[1], public_host)
    resolver = resolver or default_resolver(settings)
    if front is not None:
        from .fleet import Fleet
        from .frontapi import FRONT_PATHS, add_front_routes

        fleet = Fleet(settings, resolver, config, front)
        app = create_app(settings, None, resolver, config, manager=fleet, open_paths=FRONT_PATHS)
        add_front_routes(app, fleet)
    elif node is not None:
        from .node import NodeAgent, add_node_routes

        node.url = advertised_url(host, sock.getsockname()[1], node.address)
        manager = RuntimeManager(settings, PodmanBackend(settings), resolver, config)
        app = create_app(settings, None, resolver, config, manager=manager)
        add_node_routes(app, NodeAgent(manager, node))
        url = node.url
    else:
        app = create_app(settings, PodmanBackend(settings), resolver, config)

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:  # type: ignore[override]
            await super().startup(sockets=sockets)
            if self.should_exit:
                return
            if url_file:
                write_atomic(Path(url_file), url + "\n")
                log.info("wrote the server URL to %s", url_file)
            log.info("runtime server listening on %s", url)
            if on_ready:
                on_ready(url)

    # the stdlib loop, not uvloop: uvloop notices child exits through SIGCHLD, which only the
    # main thread receives, so podman calls from a server in a thread would never return
    ucfg = uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug",
                          timeout_graceful_shutdown=10, lifespan="on", loop="asyncio")
    return _Server(ucfg), sock, url


def serve(settings: Settings, config: ServeConfig, **kwargs) -> None:
    server, sock, _ = build_server(settings, config, **kwargs)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise SystemExit(1)


class ServerThread:
    """The real server in a thread of this process (tests, notebooks)."""

    def __init__(self, settings: Settings, config: ServeConfig, resolver: Resolver | None = None,
                 host: str = "127.0.0.1", port: int = 0, **role) -> None:
        self.server, self.sock, self.url = build_server(settings, config, host=host, port=port,
                                                        resolver=resolver, log_level="warning", **role)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        import time

        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the runtime server did not start (see its log)")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    @property
    def manager(self):
        return self.server.config.app.state.manager
