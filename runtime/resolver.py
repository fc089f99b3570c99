"""Which prebuilt image serves a requested image: the resolver the server is given.

The server never builds: every ``/start`` asks a ``Resolver`` for a prebuilt,
digest-pinned agent-server image. ``imagefarm.serve.lookup.Lookup`` (lockfile and registry
backed) is the production resolver; ``RegistryResolver`` here is a small one that reads
only the registry (tags under ``--to`` and their OCI annotations), used when the
lookup is not available and in the tests. Both are synchronous; the server calls them
in a worker thread.

Shape (what the server reads from a hit): ``image`` (``repo@sha256:...``), ``base``,
``digest``, ``verified``, ``agent_server_version`` and, optionally, ``size``.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from imagefarm import oci
from imagefarm.errors import NotFound, RegistryError
from imagefarm.names.reference import Reference, parse
from imagefarm.settings import Settings


@runtime_checkable
class Hit(Protocol):
    image: str
    base: str | None
    digest: str
    verified: bool
    agent_server_version: str | None


class Resolver(Protocol):
    def resolve(self, image: str) -> Hit | None:
        """The prebuilt image serving ``image`` (a base or a derived reference), or None."""


@dataclass(frozen=True, slots=True)
class Resolution:
    image: str
    base: str | None
    digest: str
    verified: bool = False
    agent_server_version: str | None = None
    size: int | None = None


def prefix_of(to: str) -> str:
    """``--to`` as ``registry/path`` (no scheme, no trailing slash)."""
    p = to.strip().rstrip("/")
    return p.split("://", 1)[1] if "://" in p else p


def _version_key(tag: str) -> tuple:
    m = re.search(r"-oh([0-9][0-9A-Za-z_.]*)", tag)
    parts = re.split(r"[._]", m.group(1)) if m else []
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


class RegistryResolver:
    """Resolve from the registry alone: ``<to>/<base repo>:<base tag>-oh<version>-<hash>``.

    A derived image is recognised by its ``org.opencontainers.image.base.name``
    annotation; for a base, every tag starting with ``<base tag>-oh`` under the prefix
    is a candidate, those annotated with the same base (and, if the request pins a
    base digest, that digest) qualify, and the newest agent-server version wins.
    Hits are cached for ``ttl`` seconds, misses for ``miss_ttl``.
    """

    def __init__(self, settings: Settings, client: Any = None, *, ttl: float = 300.0,
                 miss_ttl: float = 5.0) -> None:
        from imagefarm.registry import RegistryClient

        self.settings = settings
        self.prefix = prefix_of(settings.to)
        self.client = client or RegistryClient(settings)
        self.ttl, self.miss_ttl = ttl, miss_ttl
        self._cache: dict[str, tuple[float, Resolution | None]] = {}
        self._lock = threading.Lock()

    def resolve(self, image: str) -> Resolution | None:
        now = time.monotonic()
        with self._lock:
            got = self._cache.get(image)
        if got and got[0] > now:
            return got[1]
        hit = self._resolve(image)
        with self._lock:
            self._cache[image] = (now + (self.ttl if hit else self.miss_ttl), hit)
        return hit

    # -------------------------------------------------------------------------
    def _resolve(self, image: str) -> Resolution | None:
        ref = parse(image)
        if ref.name.startswith(self.prefix + "/"):
            return self._derived(ref)
        return self._from_base(ref)

    def _manifest(self, ref: Reference):
        try:
            return self.client.resolve(ref)
        except NotFound:
            return None

    def _hit(self, ref: Reference, resolved, base: str | None) -> Resolution:
        m = resolved.manifest
        ann = dict(m.annotations or {})
        size = sum(layer.size for layer in m.layers) + m.config.size
        verified = False
        try:  # attestation tags are the payload helper's; optional
            from imagefarm.farm.attest import is_verified

            verified = bool(is_verified(self.client, ref, resolved.digest))
        except Exception:  # noqa: BLE001 - no attestation means "not verified"
            verified = False
        return Resolution(image=f"{ref.name}@{resolved.digest}", base=base or ann.get(oci.ANN_BASE_NAME),
                          digest=resolved.digest, verified=verified,
                          agent_server_version=ann.get(oci.ANN_AGENT_VERSION), size=size)

    def _derived(self, ref: Reference) -> Resolution | None:
        resolved = self._manifest(ref)
        if resolved is None:
            return None
        if oci.ANN_BASE_NAME not in (resolved.manifest.annotations or {}):
            return None  # under the prefix but not made by imagefarm: not a prebuilt image
        return self._hit(ref, resolved, None)

    def _from_base(self, base: Reference) -> Resolution | None:
        repo = parse(f"{self.prefix}/{base.repository}:x")
        head = base.tag or ("sha256_" + base.digest.split(":", 1)[1][:12] if base.digest else "latest")
        try:
            tags = self.client.list_tags(repo)
        except NotFound:
            return None
        except RegistryError:
            raise
        want = str(Reference(base.registry, base.repository, base.tag))
        for tag in sorted((t for t in tags if t.startswith(head + "-oh")), key=_version_key, reverse=True):
            cand = repo.with_tag(tag)
            resolved = self._manifest(cand)
            if resolved is None:
                continue
            ann = resolved.manifest.annotations or {}
            if ann.get(oci.ANN_BASE_NAME) != want:
                continue
            if base.digest and ann.get(oci.ANN_BASE_DIGEST) != base.digest:
                continue
            return self._hit(cand, resolved, want)
        return None


def describe_base(image: str) -> str:
    """The base a request names, normalised for messages (the input if unparsable)."""
    try:
        ref = parse(image)
    except Exception:  # noqa: BLE001
        return image
    return ref.familiar
