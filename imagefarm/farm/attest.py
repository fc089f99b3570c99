"""Verification records kept in the registry, beside the image they vouch for.

A passed ``verify`` is published as a signed in-toto statement (subject: the image
digest; predicate: what was checked) in a DSSE envelope, an OCI artifact under the tag
``sha256-<hex>.verified`` in the image's repository (``imagefarm.sign.artifacts``: the
cosign-style tag scheme for registries without the referrers API). The tag is only a
hint: a record counts when a trusted key signed it for this digest. An unsigned or
forged artifact at that tag is no record (``is_verified`` is False), so the lookup, the
runtime and ``launch preflight`` never serve an image on its word.
"""

from __future__ import annotations

import logging
from typing import Any

from imagefarm import oci
from imagefarm.errors import NotFound, SignatureError
from imagefarm.names.reference import Reference
from imagefarm.registry import RegistryClient
from imagefarm.sign import artifacts

ARTIFACT_TYPE = "https://imagefarm.dev/verification/v1"
KIND = "verified"
log = logging.getLogger(__name__)


def record_tag(digest: str) -> str:
    return artifacts.tag_for(digest, KIND)


def record(client: RegistryClient, image: Reference, digest: str, result: dict[str, Any],
           image_media_type: str = oci.OCI_MANIFEST, image_size: int | None = None) -> str:
    """Sign and push the verification record of ``image@digest``; returns its digest."""
    if image_size is None:
        desc = client.head_manifest(image.with_digest(digest))
        if desc is None:
            raise NotFound(f"cannot record verification: {image.name}@{digest} is not in the registry")
        image_size, image_media_type = desc.size, desc.media_type or image_media_type
    subject = oci.Descriptor(image_media_type, digest, image_size)
    return artifacts.publish(client, image, subject, KIND, ARTIFACT_TYPE, [(image.name, digest)],
                             {"checked": result})


def read(client: RegistryClient, image: Reference, digest: str) -> dict[str, Any] | None:
    """What the signed record says was checked, or None when there is no record.
    ``SignatureError`` when the record is there but not signed by a trusted key."""
    stmt = artifacts.read(client, image, digest, KIND, ARTIFACT_TYPE, what=f"verification record of {image.name}@{digest[:19]}")
    return None if stmt is None else stmt["predicate"]["checked"]


def is_verified(client: RegistryClient, image: Reference, digest: str) -> bool:
    """Whether a trusted key signed a verification record for ``image@digest``; an
    unsigned or forged record is no record (said once in the log)."""
    try:
        return read(client, image, digest) is not None
    except SignatureError as exc:
        log.warning("%s: treated as no record", exc)
        return False
