"""The signed provenance of each derived image: what it was made from, and how.

Subject: the derived manifest digest; predicate: the base digest, the payload layer
(digest and diff_id), the recipe and its digest, and how it was made (``append``,
``relayer``, ``buildah``). Published with the image (one manifest PUT beside it, tag
``sha256-<hex>.prov``) and read back by whoever must know the image is the farm's.
"""

from __future__ import annotations

from typing import Any

from imagefarm import oci
from imagefarm.errors import SignatureError
from imagefarm.names.reference import Reference
from imagefarm.registry import RegistryClient
from imagefarm.sign import artifacts

KIND = "prov"
ARTIFACT_TYPE = "https://imagefarm.dev/provenance/v1"


def publish(client: RegistryClient, image: Reference, digest: str, size: int, *, base: Reference,
            base_digest: str, how: str, recipe: str, recipe_digest: str, agent_server_version: str,
            payload: oci.Layer | None = None) -> str:
    """Sign and put the provenance of ``image@digest`` (``size``: its manifest's bytes)."""
    predicate: dict[str, Any] = {
        "base": base.name, "base_digest": base_digest, "how": how, "recipe": recipe,
        "recipe_digest": recipe_digest, "agent_server_version": agent_server_version,
        "payload_digest": payload.digest if payload else None, "payload_diff_id": payload.diff_id if payload else None,
    }
    subjects = [(image.name, digest), (base.name, base_digest)]
    return artifacts.publish(client, image, oci.Descriptor(oci.OCI_MANIFEST, digest, size), KIND, ARTIFACT_TYPE,
                             subjects, predicate)


def read(client: RegistryClient, image: Reference, digest: str, *, required: bool = True) -> dict[str, Any] | None:
    """The signed provenance of ``image@digest``; ``SignatureError`` when it is missing
    (``required``) or not signed by a trusted key."""
    what = f"provenance of {image.name}@{digest[:19]}"
    stmt = artifacts.read(client, image, digest, KIND, ARTIFACT_TYPE, what=what)
    if stmt is None:
        if required:
            raise SignatureError(f"{what}: none beside it ({artifacts.tag_for(digest, KIND)}): "
                                 "not made by this farm, or made before images were signed; derive it again")
        return None
    return stmt["predicate"]
