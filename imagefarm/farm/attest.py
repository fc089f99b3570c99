"""Verification records kept in the registry, beside the image they vouch for.

The registry is the source of truth for what is built, and for what was proven to
boot: a passed ``verify`` is pushed as a tiny OCI artifact (``subject`` = the image,
one JSON blob with what was checked) under the tag ``sha256-<hex>.verified`` in the
image's repository -- the tag-schema fallback of OCI 1.1 referrers, which registries
without the referrers API (distribution 2.8) store as a plain tag. A HEAD on that tag
answers "verified?" without any other database.
"""

from __future__ import annotations

import json
from typing import Any

from imagefarm import oci
from imagefarm.errors import NotFound
from imagefarm.names.reference import Reference
from imagefarm.registry import RegistryClient

ARTIFACT_TYPE = "application/vnd.dev.imagefarm.verification.v1+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"


def record_tag(digest: str) -> str:
    return digest.replace(":", "-") + ".verified"


def record(client: RegistryClient, image: Reference, digest: str, result: dict[str, Any],
           image_media_type: str = oci.OCI_MANIFEST, image_size: int | None = None) -> str:
    """Push the verification record of ``image@digest``; returns the record's digest."""
    repo = image.with_digest(digest) if image.digest is None else image
    if image_size is None:
        desc = client.head_manifest(repo.with_digest(digest))
        if desc is None:
            raise NotFound(f"cannot record verification: {image.name}@{digest} is not in the registry")
        image_size, image_media_type = desc.size, desc.media_type or image_media_type
    body = oci.canonical_json(result)
    for blob in (EMPTY, body):
        d = oci.sha256_digest(blob)
        if not client.blob_exists(repo, d):
            client.upload_blob(repo, d, blob)
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": oci.sha256_digest(EMPTY), "size": len(EMPTY)},
        "layers": [{"mediaType": ARTIFACT_TYPE, "digest": oci.sha256_digest(body), "size": len(body)}],
        "subject": {"mediaType": image_media_type, "digest": digest, "size": image_size},
        "annotations": {"org.opencontainers.image.created": oci.EPOCH_ISO},
    }
    raw = oci.canonical_json(manifest)
    tagged = Reference(image.registry, image.repository, record_tag(digest))
    return client.put_manifest(tagged, raw, oci.OCI_MANIFEST)


def is_verified(client: RegistryClient, image: Reference, digest: str) -> bool:
    tagged = Reference(image.registry, image.repository, record_tag(digest))
    return client.head_manifest(tagged) is not None
