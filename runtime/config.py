"""What a runtime server (a single machine, a node process or a fleet's front) is told.

One set of values, validated once here (``__post_init__``); the CLI and the tests build it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from imagefarm.errors import ImagefarmError
from imagefarm.serve.apikey import check_key_config


@dataclass
class ServeConfig:
    api_key: str | None = None
    disable_auth: bool = False
    max_runtimes: int = 32
    port_range: tuple[int, int] = (30000, 39999)
    idle_timeout: float = 3600.0          #: seconds; 0 = never reap
    publish_address: str = "127.0.0.1"    #: where container ports are published
    public_host: str | None = None        #: host in the URLs handed out (default: see url_host)
    cpus_per_factor: float = 1.0
    memory_mib_per_factor: int = 4096
    pids_limit: int = 4096
    user_policy: Literal["image", "requested"] = "image"
    stop_on_exit: bool = False            #: remove every runtime when the server stops (SLURM)
    failed_ttl: float = 600.0
    ready_timeout: float = 900.0
    monitor_interval: float = 1.0
    log_tail: int = 50
    max_body: int = 1 << 20               #: bytes of a request body (413 beyond)
    state_dir: Path | None = None         #: default: settings.state_dir / "runtime"
    image_cache_gib: float | None = None  #: disk budget for images; idle ones evicted LRU first
    clean_start: bool = False             #: remove every container of this node at start-up (node processes)
    #: payloads pulled at start-up, before the server reports ready: ``RECIPE`` or
    #: ``RECIPE@VERSION``; None: the settings' recipe at the settings' version; (): none
    payloads: tuple[str, ...] | None = None
    warm_idle_timeout: float = 600.0      #: seconds a warm sandbox waits for a /start before it goes

    def __post_init__(self) -> None:
        lo, hi = self.port_range
        if not (1024 <= lo <= hi <= 65535):
            raise ImagefarmError(f"invalid port range {lo}-{hi}: expected A-B within 1024-65535")
        check_key_config(self.api_key, self.disable_auth, "IMAGEFARM_RUNTIME_API_KEY")
        if self.user_policy not in ("image", "requested"):
            raise ImagefarmError(f"--user-policy {self.user_policy!r}: expected image or requested")
        if not self.warm_idle_timeout > 0:
            raise ImagefarmError("--warm-idle-timeout must be a positive number of seconds")
        if self.max_runtimes < 1:
            raise ImagefarmError("--max-runtimes must be at least 1")
        if self.image_cache_gib is not None and not self.image_cache_gib > 0:
            raise ImagefarmError("--image-cache-gib must be a positive number of GiB")
        if not self.cpus_per_factor >= 0.01:  # podman reads a tiny --cpus as no limit
            raise ImagefarmError(f"--cpus-per-factor {self.cpus_per_factor}: expected at least 0.01")
        if self.memory_mib_per_factor < 6:  # podman's floor; --memory 0m means no limit
            raise ImagefarmError(f"--memory-mib-per-factor {self.memory_mib_per_factor}: expected at least 6")

    @property
    def url_host(self) -> str:
        if self.public_host:
            return self.public_host
        if self.publish_address in ("", "0.0.0.0", "::"):
            return socket.getfqdn()
        return self.publish_address

    @property
    def probe_host(self) -> str:
        return "127.0.0.1" if self.publish_address in ("", "0.0.0.0", "::") else self.publish_address
