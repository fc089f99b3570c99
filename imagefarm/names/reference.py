"""Image references: parse, normalise, print (after distribution's ``reference`` grammar).

``pandas_final:abc`` and ``docker.io/library/pandas_final:abc`` are the same image;
``namanjain12/pandas_final:abc`` lives at ``docker.io/namanjain12/pandas_final``.
A ``Reference`` is an immutable value: every change returns a new one.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

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


@dataclass(frozen=True, slots=True)
class Reference:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

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

    # -- transport ------------------------------------------------------------
    @property
    def is_loopback(self) -> bool:
        """``localhost`` or a loopback IP literal (``127.0.0.0/8``, ``[::1]``): never a
        name that merely starts with ``127.`` (``127.corp.example`` is a remote host)."""
        return is_loopback_host(self.registry)

    @property
    def api_host(self) -> str:
        """Where the registry API lives (Docker Hub answers on registry-1)."""
        return "registry-1.docker.io" if self.registry == DOCKER_HUB else self.registry


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
    if rest and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, path = first, rest
        if not _DOMAIN_RE.match(registry):
            raise InvalidReference(f"invalid registry host {registry!r} in {raw!r}")
        if registry in _HUB_ALIASES:
            registry = DOCKER_HUB
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
    return Reference(registry=registry, repository=path, tag=tag, digest=digest)


def mirrored(ref: Reference, mirrors: dict[str, str]) -> Reference:
    """Where ``ref``'s bytes are read when its registry has a mirror (``{"docker.io":
    "127.0.0.1:5001"}``, a pull-through cache): same repository, tag and digest."""
    mirror = mirrors.get(ref.registry)
    return ref.with_repository(mirror, ref.repository) if mirror else ref

