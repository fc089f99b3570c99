"""The lookup server's configuration: what ``imagefarm serve-lookup`` is told, each default
written once (the CLI's options are made from these fields) and checked when made. No web
framework is imported here: the CLI reads these defaults at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from imagefarm.errors import ConfigError
from .apikey import check_key_config


@dataclass(frozen=True)
class LookupServerConfig:
    """``serve-lookup``'s options; the API key is required unless ``disable_auth``."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8780, metadata={"help": "port to listen on"})
    lockfile: Path | None = field(default=None, metadata={"help": "answer from this lockfile first"})
    ttl: float = field(default=60.0, metadata={"help": "seconds a found answer is cached"})
    api_key: str | None = field(default=None, repr=False, metadata={
        "help": "key clients send as X-API-Key (prefer the variable: argv is visible)"})
    disable_auth: bool = field(default=False, metadata={"help": "accept requests without a key (loudly logged)"})

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port}: expected 1-65535")
        if not self.ttl >= 0:
            raise ConfigError(f"--ttl {self.ttl}: expected a number of seconds, 0 or more")
        if not self.host.strip():
            raise ConfigError("--host is empty: give an address to listen on, e.g. 127.0.0.1")
        check_key_config(self.api_key, self.disable_auth, "IMAGEFARM_LOOKUP_API_KEY")
