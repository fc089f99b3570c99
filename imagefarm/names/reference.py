"""Image names as values: ``Registry``, ``Repository``, ``Prefix`` (the ``--to`` value) and ``Reference``.

After distribution's ``reference`` grammar and go-containerregistry's ``pkg/name``:
``pandas_final:abc`` and ``docker.io/library/pandas_final:abc`` are the same image;
``namanjain12/pandas_final:abc`` lives at ``docker.io/namanjain12/pandas_final``.
Every value is immutable: every change returns a new one. The plain-HTTP rule lives
here once (``Registry.insecure``), and so does the one pinned form (``Reference.pinned``,
``repo@digest``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace
from typing import Any

from imagefarm.errors import InvalidReference

DOCKER_HUB = "docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_DOMAIN_RE = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$"
)
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$|^sha512:[a-f0-9]{128}$")
MAX_NAME = 255


class Registry(str):
    """A registry host (``127.0.0.1:5000``, ``docker.io``): a ``str``, so it keys maps and
    prints as itself, with the transport facts about it."""

    __slots__ = ()

    @property
    def is_loopback(self) -> bool:
        """``localhost`` or a loopback IP literal; never a name that merely starts with ``127.``."""
        return is_loopback_host(self)

    @property
    def api_host(self) -> str:
        """Where the registry API lives (Docker Hub answers on registry-1)."""
        return "registry-1.docker.io" if self == DOCKER_HUB else str(self)

    def insecure(self, settings: Any = None) -> bool:
        """The one plain-HTTP rule: loopback, or named in ``settings.insecure_registries``."""
        allowed = getattr(settings, "insecure_registries", None) or ()
        return self.is_loopback or self in allowed or self.api_host in allowed

    def scheme(self, settings: Any = None) -> str:
        return "http" if self.insecure(settings) else "https"

    def base_url(self, settings: Any = None) -> str:
        """``scheme://api-host``: where ``/v2/`` is."""
        return f"{self.scheme(settings)}://{self.api_host}"

    def repository(self, path: str) -> "Repository":
        return Repository(self, path)


@dataclass(frozen=True, slots=True)
class Repository:
    """``registry/path``: where tags and blobs live."""

    registry: Registry
    path: str

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.path}"

    @property
    def repository(self) -> str:
        """The path, as ``Reference.repository`` names it: repository-level client calls
        (``blob_exists``, ``list_tags``, uploads) take a ``Repository`` or a ``Reference``."""
        return self.path

    def __str__(self) -> str:
        return self.name

    def tag(self, tag: str) -> "Reference":
        return Reference(self.registry, self.path).with_tag(tag)

    def digest(self, digest: str) -> "Reference":
        """The pinned reference ``repo@digest``."""
        return Reference(self.registry, self.path).with_digest(digest)


@dataclass(frozen=True, slots=True)
class Prefix:
    """The ``--to`` value: a registry and an optional path under which prebuilt images live."""

    registry: Registry
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> "Prefix":
        """``127.0.0.1:5000/prebuilt`` (scheme and trailing ``/`` dropped); ``InvalidReference`` if bad."""
        raw = text
        text = (text or "").strip().rstrip("/")
        for scheme in ("docker://", "http://", "https://"):
            if text.startswith(scheme):
                text = text[len(scheme) :]
        if not text or any(c.isspace() for c in text) or ("@" in text):
            raise InvalidReference(f"invalid registry prefix {raw!r}: expected REGISTRY[/PATH], "
                                   "e.g. 127.0.0.1:5000/prebuilt")
        first, _, rest = text.partition("/")
        if _is_registry(first):
            registry, path = _registry(first, raw), rest
        else:
            registry, path = Registry(DOCKER_HUB), text
        if path and not _PATH_RE.match(path):
            raise InvalidReference(
                f"invalid registry prefix {raw!r}: path {path!r} must be lower-case [a-z0-9] components "
                "joined by '.', '_', '__' or '-', separated by '/'")
        return cls(registry, path)

    def __str__(self) -> str:
        return f"{self.registry}/{self.path}" if self.path else str(self.registry)

    def repository(self, name: str) -> Repository:
        """The repository ``name`` under this prefix (``<prefix>/<name>``)."""
        path = f"{self.path}/{name}" if self.path else name
        if len(self.registry) + 1 + len(path) > MAX_NAME:
            raise InvalidReference(
                f"repository {self.registry}/{path!r} is longer than {MAX_NAME} characters: use a shorter --to")
        return Repository(self.registry, path)

    def holds(self, ref: "Reference") -> bool:
        """Is ``ref`` a repository under this prefix?"""
        return ref.registry == self.registry and (not self.path or ref.repository.startswith(self.path + "/"))


def _is_registry(first: str) -> bool:
    return "." in first or ":" in first or first == "localhost" or first.startswith("[")


def _registry(host: str, raw: str) -> Registry:
    if not _DOMAIN_RE.match(host):
        raise InvalidReference(f"invalid registry host {host!r} in {raw!r}")
    return Registry(DOCKER_HUB if host in _HUB_ALIASES else host)


@dataclass(frozen=True, slots=True)
class Reference:
    registry: Registry
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        if type(self.registry) is not Registry:
            object.__setattr__(self, "registry", Registry(self.registry))

    @classmethod
    def parse(cls, text: str) -> "Reference":
        return parse(text)

    # -- printing -------------------------------------------------------------
    @property
    def name(self) -> str:
        """``registry/repository`` with no tag or digest."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    @property
    def familiar(self) -> str:
        """The short form people type: no ``docker.io/`` and no ``library/``."""
        out = str(self)
        if self.registry == DOCKER_HUB:
            out = out[len(DOCKER_HUB) + 1 :]
            if out.startswith("library/") and "/" not in self.repository[8:]:
                out = out[len("library/") :]
        return out

    @property
    def repo(self) -> Repository:
        return Repository(self.registry, self.repository)

    @property
    def pinned(self) -> str:
        """The one pinned form, ``registry/repository@digest`` (no tag); needs a digest."""
        if not self.digest:
            raise InvalidReference(f"{self} is not pinned: it has no digest")
        return f"{self.name}@{self.digest}"

    @property
    def path(self) -> str:
        """``repository[:tag][@digest]``: the name with no registry. A dataset's image and
        the same image read through a mirror differ only in the registry, not here."""
        return str(self)[len(self.registry) + 1:]

    @property
    def identifier(self) -> str:
        """What goes after ``/manifests/``: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    # -- changes --------------------------------------------------------------
    def with_tag(self, tag: str) -> "Reference":
        if not TAG_RE.match(tag):
            raise InvalidReference(f"invalid tag {tag!r}: tags match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")
        return replace(self, tag=tag, digest=None)

    def with_digest(self, digest: str) -> "Reference":
        if not DIGEST_RE.match(digest):
            raise InvalidReference(f"invalid digest {digest!r}: expected sha256:<64 hex>")
        return replace(self, digest=digest)

    def with_repository(self, registry: str, repository: str) -> "Reference":
        return replace(self, registry=registry, repository=repository)

    # -- transport (the registry's) ---------------------------------------------
    @property
    def is_loopback(self) -> bool:
        return self.registry.is_loopback

    @property
    def api_host(self) -> str:
        return self.registry.api_host


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (``name[:port]``, ``[v6][:port]``) is this machine's loopback."""
    if host.startswith("["):
        name = host[1:host.find("]")] if "]" in host else host[1:]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def parse(text: str) -> Reference:
    """Parse and normalise; raise ``InvalidReference`` naming what is wrong."""
    if not isinstance(text, str):
        raise InvalidReference(f"image reference must be a string, got {type(text).__name__}")
    raw = text
    text = text.strip()
    if not text:
        raise InvalidReference("empty image reference: expected something like namanjain12/pandas_final:<tag>")
    if any(c.isspace() for c in text):
        raise InvalidReference(f"invalid image reference {raw!r}: contains whitespace")
    for scheme in ("docker://", "http://", "https://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]

    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not DIGEST_RE.match(digest):
            raise InvalidReference(
                f"invalid digest in {raw!r}: {digest!r} is not sha256:<64 lowercase hex>"
            )

    tag = None
    last_slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > last_slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not TAG_RE.match(tag):
            why = "longer than 128 characters" if len(tag) > 128 else "only [A-Za-z0-9_.-], not starting with . or -"
            raise InvalidReference(f"invalid tag in {raw!r}: {tag[:40]!r}{'...' if len(tag) > 40 else ''} ({why})")

    first, _, rest = text.partition("/")
    if rest and _is_registry(first):
        registry, path = _registry(first, raw), rest
    else:
        registry, path = DOCKER_HUB, text
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"

    if not path:
        raise InvalidReference(f"invalid image reference {raw!r}: no repository name")
    if not _PATH_RE.match(path):
        hint = " (repository names must be lower case)" if path.lower() != path else ""
        raise InvalidReference(
            f"invalid repository {path!r} in {raw!r}{hint}: components are [a-z0-9] "
            "joined by '.', '_', '__' or '-', separated by '/'"
        )
    if len(registry) + 1 + len(path) > MAX_NAME:
        raise InvalidReference(f"repository name in {raw!r} is longer than {MAX_NAME} characters")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry=Registry(registry), repository=path, tag=tag, digest=digest)


def mirrored(ref: Reference, mirrors: dict[str, str]) -> Reference:
    """Where ``ref``'s bytes are read when its registry has a mirror (``{"docker.io":
    "127.0.0.1:5001"}``, a pull-through cache): same repository, tag and digest."""
    mirror = mirrors.get(ref.registry)
    return ref.with_repository(mirror, ref.repository) if mirror else ref

