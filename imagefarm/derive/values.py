"""What a derive takes and gives, as immutable values.

``PayloadLike`` is the small surface derive needs from a payload (the payload module's
own ``Payload`` satisfies it, and so does ``AppendPayload`` built from plain
arguments): one layer blob on disk plus the recipe identity that names the result.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

from imagefarm import oci
from imagefarm.errors import PayloadError


@runtime_checkable
class PayloadLike(Protocol):
    @property
    def layer(self) -> oci.Layer: ...
    @property
    def recipe_name(self) -> str: ...
    @property
    def recipe_digest(self) -> str: ...
    @property
    def agent_server_version(self) -> str: ...
    @property
    def env(self) -> Sequence[str]: ...


@dataclass(frozen=True, slots=True)
class AppendPayload:
    """A payload from plain arguments (tests, benchmarks, callers without a Recipe)."""

    layer: oci.Layer
    recipe_name: str
    recipe_digest: str
    agent_server_version: str
    env: tuple[str, ...] = ()

    @classmethod
    def of(cls, payload: Any, recipe: Any = None) -> "AppendPayload":
        """From ``imagefarm.payload.Payload`` (+ its ``Recipe`` for the env items)."""
        env = getattr(payload, "env", None) or (getattr(recipe, "env", None) or ())
        return cls(payload.layer, payload.recipe_name, payload.recipe_digest,
                   payload.agent_server_version, tuple(env))


@dataclass(frozen=True, slots=True)
class DeriveResult:
    """One derive: where the image went, and what it cost."""

    base: str            #: base reference as asked for (normalised)
    base_digest: str     #: the platform image manifest the derived image is built on
    image: str           #: derived reference with its deterministic tag
    digest: str          #: derived manifest digest
    skipped: bool        #: the tag already held this derive: no work was done
    blobs_uploaded: int  #: blobs whose bytes were sent (uploads and cross-registry copies)
    bytes_moved: int     #: blob bytes sent to the target registry
    requests: int        #: HTTP requests made (retries and token fetches included)
    kind: str = "append"  #: "append" (manifest surgery) or "buildah"
    published: bool = True  #: the tag names it (False: pushed by digest, awaiting verify)

    @property
    def ref(self) -> str:
        """``image@digest``: what a lockfile pins and a runtime starts."""
        return f"{self.image}@{self.digest}"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ref": self.ref}


def payload_from_file(path: str | Path, recipe: Any) -> AppendPayload:
    """A payload from a ready tar+gzip layer blob on disk (digest and diff_id computed
    by streaming it once), named by ``recipe`` (name, digest, agent-server version, env)."""
    path = Path(path)
    outer, inner = hashlib.sha256(), hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                outer.update(chunk)
        with gzip.open(path, "rb") as gz:
            while chunk := gz.read(1 << 20):
                inner.update(chunk)
    except (OSError, EOFError) as exc:
        raise PayloadError(f"payload layer {path} is not a readable tar+gzip blob: {exc}") from None
    layer = oci.Layer(path, "sha256:" + outer.hexdigest(), path.stat().st_size, "sha256:" + inner.hexdigest())
    return AppendPayload(layer, recipe.name, recipe.digest, recipe.agent_server_version, tuple(recipe.env))
