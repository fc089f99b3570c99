"""Registry credentials and the auth challenge dance (anonymous, basic, bearer).

Credentials come from the same auth file podman/docker write (``auths`` ->
``auth`` = base64 ``user:password``). A registry tells us how to authenticate in its
``WWW-Authenticate`` header: ``Basic`` means send the credentials on every request;
``Bearer realm=...,service=...`` means fetch a token from the realm for the scopes a
request needs. Tokens are cached per (registry, scopes) until shortly before expiry,
so a farm of derives asks the token server once per repository, not per request.
Credentials go to a token realm only over https or on the registry's own host: a
registry cannot send them in clear text to a third party by naming an ``http://`` realm.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from imagefarm.errors import AuthError, ConfigError

#: seconds a token is considered valid when the server does not say (spec default 60)
DEFAULT_TOKEN_TTL = 60
#: refresh this many seconds before expiry
TOKEN_SLACK = 10


def auth_file_candidates(explicit: Path | None = None) -> list[Path]:
    """Where credentials are looked for, first hit wins (podman's order, then docker's)."""
    if explicit:
        return [Path(explicit)]
    out: list[Path] = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        out.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        out.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    out.append(Path.home() / ".docker" / "config.json")
    return out


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str
    source: str = ""

    @property
    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def load_credentials(explicit: Path | None = None) -> dict[str, Credentials]:
    """Registry host -> credentials from the first auth file that exists."""
    for path in auth_file_candidates(explicit):
        if not path.is_file():
            if explicit:
                raise ConfigError(f"auth file {path} does not exist (set by --auth-file / IMAGEFARM_AUTH_FILE)")
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"auth file {path} is not readable JSON: {exc}") from None
        out: dict[str, Credentials] = {}
        for key, entry in (doc.get("auths") or {}).items():
            creds = _entry(entry, str(path))
            if creds:
                out[_host_of(key)] = creds
        return out
    return {}


def _entry(entry: dict, source: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    if entry.get("auth"):
        try:
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise ConfigError(f"auth file {source}: an `auth` field is not base64 user:password") from None
        return Credentials(user, password, source)
    if entry.get("username"):
        return Credentials(entry["username"], entry.get("password", ""), source)
    return None


def _host_of(key: str) -> str:
    """Auth file keys may be URLs (``https://index.docker.io/v1/``) or host[/path]."""
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            key = key[len(scheme):]
    host = key.split("/", 1)[0]
    return "docker.io" if host in ("index.docker.io", "registry-1.docker.io") else host


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "basic" | "bearer"
    realm: str = ""
    service: str = ""
    scope: str = ""


def parse_challenge(header: str) -> Challenge | None:
    """Parse ``WWW-Authenticate``; parameters via oras-py's parser (it skips the scheme)."""
    if not header:
        return None
    from oras.auth.utils import parse_auth_header  # lazy: pulls in requests

    scheme = header.strip().split(" ", 1)[0].lower()
    if scheme not in ("basic", "bearer"):
        return None
    h = parse_auth_header(header)
    return Challenge(scheme, h.realm or "", h.service or "", h.scope or "")


def scope(repository: str, push: bool = False) -> str:
    return f"repository:{repository}:{'pull,push' if push else 'pull'}"


class Authenticator:
    """Per-client auth state: what each registry wants, cached tokens. Thread-safe."""

    def __init__(self, credentials: dict[str, Credentials],
                 fetch_token: Callable[[Challenge, Sequence[str], Credentials | None], tuple[str, float]]):
        self._creds = credentials
        self._fetch = fetch_token
        self._lock = threading.Lock()
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, tuple[str, ...]], tuple[str, float]] = {}

    def credentials(self, registry: str) -> Credentials | None:
        return self._creds.get(registry)

    def header(self, registry: str, scopes: Sequence[str]) -> str | None:
        """The Authorization header to send up front (None: anonymous / not known yet)."""
        ch = self._challenges.get(registry)
        if ch is None:
            return None
        if ch.scheme == "basic":
            creds = self._creds.get(registry)
            return creds.basic if creds else None
        return "Bearer " + self._token(registry, ch, scopes)

    def learn(self, registry: str, header: str) -> None:
        """Remember how ``registry`` authenticates (from its ``GET /v2/`` challenge)."""
        ch = parse_challenge(header)
        if ch is not None:
            with self._lock:
                self._challenges[registry] = ch

    def challenged(self, registry: str, header: str, scopes: Sequence[str], *, what: str) -> str:
        """Learn from a 401; return the header to retry with, or raise AuthError."""
        ch = parse_challenge(header)
        if ch is None:
            raise AuthError(f"registry {registry} answered 401 to {what} without a usable "
                            f"WWW-Authenticate challenge ({header!r})")
        creds = self._creds.get(registry)
        if ch.scheme == "basic" and creds is None:
            raise AuthError(no_credentials(registry, what))
        with self._lock:
            known = self._challenges.get(registry)
            self._challenges[registry] = ch
            if ch.scheme == "bearer":
                self._tokens.pop((registry, tuple(sorted(scopes))), None)
        if known == ch and ch.scheme == "basic":
            raise AuthError(rejected(registry, what, creds))
        if ch.scheme == "basic":
            return creds.basic  # type: ignore[union-attr]
        extra = [ch.scope] if ch.scope and ch.scope not in scopes else []
        return "Bearer " + self._token(registry, ch, [*scopes, *extra])

    def _token(self, registry: str, ch: Challenge, scopes: Sequence[str]) -> str:
        key = (registry, tuple(sorted(set(scopes))))
        now = time.monotonic()
        hit = self._tokens.get(key)
        if hit and hit[1] > now:
            return hit[0]
        creds = self._creds.get(registry)
        token, ttl = self._fetch(ch, key[1], creds if realm_may_get_credentials(ch.realm, registry) else None)
        with self._lock:
            self._tokens[key] = (token, now + max(1.0, ttl - TOKEN_SLACK))
        return token


def realm_may_get_credentials(realm: str, registry: str) -> bool:
    """Send credentials to a token realm only over https, or to the registry's own host."""
    parts = urllib.parse.urlsplit(realm)
    if parts.scheme == "https":
        return True
    reg = urllib.parse.urlsplit(f"//{registry}").hostname
    return bool(parts.hostname) and parts.hostname == reg


def no_credentials(registry: str, what: str) -> str:
    return (f"registry {registry} needs credentials for {what} and none were found: run "
            f"`podman login {registry}` (or point --auth-file / REGISTRY_AUTH_FILE at an auth file)")


def rejected(registry: str, what: str, creds: Credentials | None) -> str:
    who = f"user {creds.username!r} from {creds.source}" if creds else "anonymous access"
    return (f"registry {registry} denied {what} for {who}: check the password and the "
            f"account's rights, then `podman login {registry}` (or fix the auth file)")
