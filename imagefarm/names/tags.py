"""The derived image's name: a pure function of what went into it.

``derived_reference(base, base_digest, recipe, recipe_digest, version, to)`` gives e.g.
``127.0.0.1:5000/prebuilt/namanjain12/pandas_final:<base-tag>-oh1.58.2-<hash12>``:
a person reads which base (repository path and tag) and which agent-server version it
holds; the hash of (base digest, recipe name, recipe digest, version) makes it unique,
so an existing tag means "already built" and every derive is idempotent. No clock, no
randomness, no registry lookup.
"""

from __future__ import annotations

import hashlib
import re

from imagefarm.errors import InvalidReference
from .reference import MAX_NAME, TAG_RE, Reference, parse

MAX_TAG = 128
HASH_LEN = 12
_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


def derive_hash(base_digest: str, recipe: str, recipe_digest: str, agent_version: str) -> str:
    key = "\n".join(("imagefarm/derive/v1", base_digest, recipe, recipe_digest, agent_version))
    return hashlib.sha256(key.encode()).hexdigest()[:HASH_LEN]


def derived_tag(base: Reference, base_digest: str, recipe: str, recipe_digest: str,
                agent_version: str) -> str:
    """``<base-tag>-oh<version>[-<recipe>]-<hash>``, at most 128 valid tag characters.

    The recipe name shows only when it is not ``default``. A base named by digest
    only uses ``sha256_<12 hex>`` as its tag part. When too long, the base tag part is
    cut: the hash already tells apart any two bases.
    """
    if not base_digest.startswith("sha256:"):
        raise InvalidReference(f"base digest {base_digest!r} is not sha256:<hex>")
    head = base.tag or "sha256_" + base_digest.split(":", 1)[1][:12]
    version = _BAD.sub("_", agent_version).strip("._-")
    parts = [f"oh{version}" if version else "oh"]
    if recipe and recipe != "default":
        parts.append(_BAD.sub("_", recipe))
    parts.append(derive_hash(base_digest, recipe, recipe_digest, agent_version))
    tail = "-" + "-".join(parts)
    if len(tail) > MAX_TAG - 1:  # absurd version/recipe strings: keep the hash only
        tail = "-" + parts[-1]
    room = MAX_TAG - len(tail)
    tag = head[:room].rstrip(".-") + tail
    if not TAG_RE.match(tag):
        raise InvalidReference(f"derived tag {tag!r} is not a valid OCI tag")
    return tag


def derived_reference(base: Reference | str, base_digest: str, recipe: str, recipe_digest: str,
                      agent_version: str, to: str) -> Reference:
    """Where the derived image of ``base`` goes under the prefix ``to`` (registry[/path])."""
    base = parse(base) if isinstance(base, str) else base
    prefix = to.strip().rstrip("/")
    if "://" in prefix:
        prefix = prefix.split("://", 1)[1]
    name = f"{prefix}/{base.repository}"
    if len(name) > MAX_NAME:
        raise InvalidReference(
            f"derived repository {name!r} is longer than {MAX_NAME} characters: use a shorter --to")
    target = parse(f"{name}:x")
    return target.with_tag(derived_tag(base, base_digest, recipe, recipe_digest, agent_version))
