"""Manifests and indexes as immutable values: parse, validate, pick a platform.

Parsing is strict on purpose: a derive must refuse things that are not container
images (OCI artifacts, schema 1, unknown layer types) *before* touching the target
registry, with a message that says what the thing is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from imagefarm import oci
from imagefarm.errors import UnsupportedMedia
from imagefarm.oci import Descriptor, parse_platform

#: refuse manifests bigger than this (distribution's own limit; protects memory)
MANIFEST_LIMIT = 4 * 1024 * 1024

SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
CONFIG_TYPES = (oci.OCI_CONFIG, oci.DOCKER_CONFIG)
NONDISTRIBUTABLE = (
    oci.DOCKER_FOREIGN_LAYER,
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)
LAYER_TYPES = frozenset((*oci.LAYER_TYPES, *NONDISTRIBUTABLE))
#: docker layer media type -> the OCI one for the same bytes
TO_OCI_LAYER = {
    oci.DOCKER_LAYER_GZIP: oci.OCI_LAYER_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar": oci.OCI_LAYER_TAR,
}

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Manifest:
    """An image manifest (OCI or Docker v2 schema 2) and the exact bytes it came from."""

    raw: bytes = field(repr=False)
    digest: str
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=lambda: _EMPTY, compare=False)

    @property
    def is_docker(self) -> bool:
        return self.media_type == oci.DOCKER_MANIFEST

    @property
    def foreign_layers(self) -> tuple[Descriptor, ...]:
        return tuple(d for d in self.layers if d.media_type in NONDISTRIBUTABLE)


@dataclass(frozen=True, slots=True)
class Index:
    """An OCI image index or Docker manifest list."""

    raw: bytes = field(repr=False)
    digest: str
    media_type: str
    manifests: tuple[Descriptor, ...]

    @property
    def platforms(self) -> list[str]:
        return [format_platform(d.platform) for d in self.manifests if d.platform]


def parse_manifest(raw: bytes, content_type: str | None = None, *, digest: str | None = None,
                   where: str = "manifest") -> Manifest | Index:
    """Parse manifest bytes; ``UnsupportedMedia`` says why a thing is not an image."""
    if len(raw) > MANIFEST_LIMIT:
        raise UnsupportedMedia(f"{where}: manifest is {len(raw)} bytes, over the {MANIFEST_LIMIT} byte limit")
    digest = digest or oci.sha256_digest(raw)
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnsupportedMedia(f"{where}: manifest is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise UnsupportedMedia(f"{where}: manifest is not a JSON object")
    ctype = (content_type or "").split(";")[0].strip()
    media_type = doc.get("mediaType") or ctype
    if doc.get("schemaVersion") == 1 or media_type in SCHEMA1:
        raise UnsupportedMedia(
            f"{where}: Docker schema 1 manifest (deprecated, unsupported): "
            "re-push it with `skopeo copy --format v2s2` or a current docker/podman")
    if doc.get("schemaVersion") != 2:
        raise UnsupportedMedia(f"{where}: unknown schemaVersion {doc.get('schemaVersion')!r}")
    if not media_type:
        # OCI allows omitting mediaType: tell manifest from index by shape
        media_type = oci.OCI_INDEX if "manifests" in doc else oci.OCI_MANIFEST
    try:
        if media_type in oci.INDEX_TYPES:
            return Index(raw, digest, media_type, tuple(Descriptor.from_json(d) for d in doc["manifests"]))
        if media_type not in oci.MANIFEST_TYPES:
            raise UnsupportedMedia(f"{where}: media type {media_type!r} is not an image manifest or index")
        config = Descriptor.from_json(doc["config"])
        layers = tuple(Descriptor.from_json(d) for d in doc.get("layers") or ())
    except (KeyError, TypeError, ValueError) as exc:
        raise UnsupportedMedia(f"{where}: malformed manifest (missing or bad {exc})") from None
    if doc.get("artifactType") or config.media_type not in CONFIG_TYPES:
        kind = doc.get("artifactType") or config.media_type
        raise UnsupportedMedia(
            f"{where}: is an OCI artifact ({kind}), not a container image: only images "
            f"(config {oci.OCI_CONFIG} or {oci.DOCKER_CONFIG}) can be derived")
    for d in layers:
        if d.media_type not in LAYER_TYPES:
            raise UnsupportedMedia(f"{where}: layer {d.digest[:19]} has unsupported media type {d.media_type!r}")
    ann = doc.get("annotations") or {}
    return Manifest(raw, digest, media_type, config, layers, MappingProxyType(dict(ann)))


def format_platform(p: Mapping[str, Any]) -> str:
    out = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
    return out + (f"/{p['variant']}" if p.get("variant") else "")


def select_platform(index: Index, platform: str, *, where: str = "index") -> Descriptor:
    """The index entry for ``platform`` (variant compared only when asked for)."""
    want = parse_platform(platform)
    for d in index.manifests:
        p = d.platform or {}
        if d.media_type not in oci.MANIFEST_TYPES:
            continue
        if p.get("os") != want["os"] or p.get("architecture") != want["architecture"]:
            continue
        if "variant" in want and p.get("variant") != want["variant"]:
            continue
        return d
    have = ", ".join(index.platforms) or "none listed"
    raise UnsupportedMedia(f"{where}: no image for platform {platform} (index has: {have})")
