"""One settings model for every command: flags override ``IMAGEFARM_*`` variables.

The same name means the same thing everywhere: ``--to`` / ``IMAGEFARM_TO`` is the
registry prefix that prebuilt images go to in derive, prebuild, lookup, runtime
serve and launch. Values are checked when the settings are made: a bad flag or
variable is one ``ConfigError`` line naming it (``Settings.load``), never a traceback.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from imagefarm.errors import ConfigError
from imagefarm.names.reference import Prefix
from imagefarm.oci import parse_platform


def _xdg(var: str, fallback: str) -> Path:
    return Path(os.environ.get(var) or Path.home() / fallback)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEFARM_", frozen=True, extra="forbid")

    to: str = Field(
        "127.0.0.1:5000/prebuilt",
        description="registry prefix prebuilt images are pushed to and looked up in",
    )
    recipe: str = Field("default", description="recipe name (a file in recipes/) or path")
    agent_server_version: str | None = Field(
        None, description="openhands-agent-server version: builds the recipe at it, and lookups and "
                          "runtime starts ask for it (default: the recipe's to build, the newest verified to serve)")
    platform: str = Field("linux/amd64", description="platform chosen from image indexes")
    insecure_registries: list[str] = Field(
        default_factory=list,
        description="registries spoken to over plain HTTP besides localhost/127.0.0.1",
    )
    auth_file: Path | None = Field(
        None, description="docker/podman auth file (default: the usual places)"
    )
    payload_from: str | None = Field(
        None, description="registry prefix to find the payload in when the cache lacks it (after --to)",
    )
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker and backend")
    state_dir: Path = Field(
        default_factory=lambda: _xdg("XDG_STATE_HOME", ".local/state") / "imagefarm",
        description="container storage, job state, runtime server state",
    )
    cache_dir: Path = Field(
        default_factory=lambda: _xdg("XDG_CACHE_HOME", ".cache") / "imagefarm",
        description="payload blobs, builder rootfs, fixture rootfs",
    )
    config_dir: Path = Field(
        default_factory=lambda: _xdg("XDG_CONFIG_HOME", ".config") / "imagefarm",
        description="the farm's signing key (keys/farm.key, 0600; made on first use or by `imagefarm keys init`)",
    )
    trusted_keys: str | None = Field(
        None, description="public keys (PEM files, or directories of *.pub, separated by ':') whose "
                          "signatures are trusted besides this machine's own key",
    )
    recipes_dir: Path = Field(
        default_factory=lambda: _repo_recipes(), description="where recipe files live"
    )
    registry_concurrency: int = Field(16, ge=1, description="cap on parallel registry calls")
    copies_per_source: int = Field(
        4, ge=1, description="cap on blobs copied at once from one source registry (per process)")
    # re-layering reads untrusted base layers (derive.relayer): what one may cost
    relayer_max_header_bytes: int = Field(
        1 << 20, ge=512, description="largest PAX / GNU long-name tar header a re-layered base may hold (bytes)")
    relayer_max_entries: int = Field(2_000_000, ge=1, description="most tar entries in one re-layered base layer")
    relayer_max_unpacked_bytes: int = Field(
        32 << 30, ge=1, description="most bytes one re-layered base layer may unpack to")
    relayer_max_ratio: float = Field(
        50.0, gt=1, description="most a re-layered base layer may unpack to, as a multiple of its compressed "
                                "size (layers under 64 MiB unpacked are exempt: tiny files compress far better)")
    relayer_max_spool_bytes: int = Field(
        32 << 30, ge=1, description="most file contents one re-layering group keeps on disk at once (bytes)")
    relayer_group_max: int = Field(
        32, ge=2, description="most bases re-layered as one group (one task: its trees are read and compared "
                              "together; a larger repository is split into groups of this size)")
    mirrors: dict[str, str] = Field(
        default_factory=dict,
        description='registry -> the mirror its images are read through, as JSON ({"docker.io": '
                    '"127.0.0.1:5001"}, e.g. `imagefarm dev up --cache-registry docker.io`); images keep the '
                    "registry's name",
    )

    @field_validator("to")
    @classmethod
    def _check_to(cls, v: str) -> str:
        Prefix.parse(v)  # InvalidReference is a ValueError: pydantic reports it
        return v

    @field_validator("trusted_keys")
    @classmethod
    def _check_trusted(cls, v: str | None) -> str | None:
        if v:
            trusted_key_files(v)  # ValueError: pydantic reports it, one line
        return v

    @field_validator("agent_server_version")
    @classmethod
    def _check_version(cls, v: str | None) -> str | None:
        return None if v is None else check_version(v)

    @field_validator("platform")
    @classmethod
    def _check_platform(cls, v: str) -> str:
        try:
            parse_platform(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return v

    @property
    def prefix(self) -> Prefix:
        """``to`` as a value (checked when the settings were made; parsed once per distinct
        text): where prebuilt images go and are looked up. A property, not a cached field,
        so ``model_copy(update={"to": ...})`` can never carry a stale prefix."""
        return _prefix(self.to)

    @property
    def broker(self) -> str:
        """The Redis URL to connect with: ``broker_url``, plus the password ``imagefarm dev
        up`` generated (``state_dir/dev/redis.password``, 0600) when the URL names none and
        points at this machine. Never print it."""
        return dev_broker(self.broker_url, self.state_dir)

    @classmethod
    def load(cls, **overrides: Any) -> "Settings":
        """Settings from the environment with flags (non-None values) on top; a bad value
        raises one ``ConfigError`` line naming the flag or ``IMAGEFARM_*`` variable."""
        flags = {k: v for k, v in overrides.items() if v is not None}
        try:
            return cls(**flags)
        except ValidationError as exc:
            raise ConfigError(_one_line(exc, flags)) from None
        except SettingsError as exc:  # a list variable that is not JSON
            m = re.search(r'field "(\w+)"', str(exc))
            var = f"IMAGEFARM_{m.group(1).upper()}" if m else "an IMAGEFARM_* variable"
            raise ConfigError(f"{var}={os.environ.get(var)!r}: not valid JSON (list and map values are JSON, e.g. IMAGEFARM_INSECURE_REGISTRIES='[\"reg:5000\"]')"
                              ) from None


def trusted_key_files(value: str) -> list[Path]:
    """The key files ``IMAGEFARM_TRUSTED_KEYS`` names, each an ed25519 PEM public key
    (``ValueError``, one line, when not): checked when the settings are made."""
    out: list[Path] = []
    for part in (p.strip() for p in value.split(os.pathsep)):
        if not part:
            continue
        p = Path(part).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix == ".pub" and q.is_file())
            if not found:
                raise ValueError(f"{part}: a directory with no *.pub key in it")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise ValueError(f"{part}: no such file or directory")
    for p in out:
        load_public_key(p)
    return out


def load_public_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (ValueError, TypeError, OSError) as exc:
        raise ValueError(f"{path}: not a PEM public key ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an ed25519 public key")
    return key


DEV_REDIS_USER = "farm"


def dev_password_file(state_dir: Path) -> Path:
    return Path(state_dir) / "dev" / "redis.password"


def dev_broker(url: str, state_dir: Path) -> str:
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(url)
    if u.password or u.username or u.hostname not in ("127.0.0.1", "localhost"):
        return url
    try:
        pw = dev_password_file(state_dir).read_text().strip()
    except OSError:
        return url
    if not pw:
        return url
    return urlunsplit(u._replace(netloc=f"{DEV_REDIS_USER}:{pw}@{u.netloc}"))


_prefix = lru_cache(maxsize=256)(Prefix.parse)
_VERSION_TEXT = re.compile(r"^[0-9][0-9A-Za-z.+!_-]{0,63}$")


def check_version(v: str) -> str:
    """``v`` if it is a PEP 440 version a tag can carry (``ValueError`` otherwise): one
    check for the flag, the variable, the lookup API field and the /start variable."""
    from packaging.version import InvalidVersion, Version

    try:
        Version(v)
    except (InvalidVersion, TypeError):
        raise ValueError(f"{v!r} is not a version like 1.58.2") from None
    if not _VERSION_TEXT.match(v):
        raise ValueError(f"{v!r} is not a version like 1.58.2") from None
    return v


def version_key(v: str):
    """Order of agent-server versions (newest last); text that is no version sorts first."""
    from packaging.version import InvalidVersion, Version

    try:
        return (1, Version(v))
    except (InvalidVersion, TypeError):
        return (0, Version("0"))


def _one_line(exc: ValidationError, flags: dict[str, Any]) -> str:
    """``--to 'a b': invalid registry prefix ...; IMAGEFARM_REGISTRY_CONCURRENCY='x': ...``."""
    parts = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        where = f"--{field.replace('_', '-')}" if field in flags else f"IMAGEFARM_{field.upper()}"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}={err.get('input')!r}: {msg}" if "input" in err else f"{where}: {msg}")
    return "; ".join(parts)


def _repo_recipes() -> Path:
    here = Path(__file__).resolve().parent
    # a source checkout (editable install) has recipes/ beside the package; a wheel
    # carries them as the package data imagefarm/recipes
    for candidate in (here.parent / "recipes", here / "recipes"):
        if candidate.is_dir():
            return candidate
    return here.parent / "recipes"
