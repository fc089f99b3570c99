"""Signed statements kept in the registry beside their subject.

Distribution 2.8 (and many registries) have no referrers API, so an attestation is an
OCI artifact manifest (``subject`` = the image, ``artifactType`` = the predicate's)
under a tag derived from the subject's digest: ``sha256-<hex>.<kind>``, cosign's tag
scheme. Chosen over the OCI 1.1 referrers *tag schema* (one image index per subject,
listing every referrer) because each kind has exactly one statement per subject: one
tag per (subject, kind) is one PUT with no read-modify-write of a shared index, so
concurrent writers cannot lose each other's entries, and a reader asks one GET.

The DSSE envelope rides in the manifest's annotations (``dev.imagefarm.dsse``) with the
empty blob as its one layer: publishing a statement costs one manifest PUT (the empty
blob is put once per repository), which keeps derive fast; the tag is a hint, the
signature inside is the proof.
"""

from __future__ import annotations

import json
import threading
from typing import Any
from weakref import WeakKeyDictionary

from imagefarm import oci
from imagefarm.errors import NotFound, RegistryError, SignatureError
from imagefarm.names.reference import Reference
from imagefarm.registry import RegistryClient

from . import envelope
from .keys import Signer, TrustStore, signer, trust_store

ANN_ENVELOPE = "dev.imagefarm.dsse"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
EMPTY_DIGEST = oci.sha256_digest(EMPTY)


class _Once:
    """The empty blob in one repository: put by one thread while the others wait."""
    def __init__(self) -> None:
        self.lock, self.done = threading.Lock(), False


_empty_lock = threading.Lock()
_empty_in: "WeakKeyDictionary[RegistryClient, dict[str, _Once]]" = WeakKeyDictionary()


def tag_for(digest: str, kind: str) -> str:
    return digest.replace(":", "-") + "." + kind


def farm_signer(settings: Any) -> Signer:
    return signer(settings.config_dir)


def farm_trust(settings: Any) -> TrustStore:
    return trust_store(settings.config_dir, settings.trusted_keys)


def _ensure_empty(client: RegistryClient, repo: Reference, *, again: bool = False) -> None:
    """Put the empty blob into ``repo`` once per client. One writer per repository at a
    time: the registry's filesystem driver rewrites a blob's link in place, so a second
    upload of the same blob can make a concurrent manifest PUT see it missing."""
    key = f"{repo.registry}/{repo.repository}"
    with _empty_lock:
        once = _empty_in.setdefault(client, {}).setdefault(key, _Once())
    with once.lock:
        if once.done and not again:
            return
        if again or not client.blob_exists(repo, EMPTY_DIGEST):
            client.upload_blob(repo, EMPTY_DIGEST, EMPTY)
        once.done = True


def manifest_for(env: dict[str, Any], artifact_type: str, subject: oci.Descriptor) -> bytes:
    return oci.canonical_json({
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": EMPTY_TYPE, "digest": EMPTY_DIGEST, "size": len(EMPTY)},
        "layers": [{"mediaType": EMPTY_TYPE, "digest": EMPTY_DIGEST, "size": len(EMPTY)}],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size},
        "annotations": {"org.opencontainers.image.created": oci.EPOCH_ISO,
                        ANN_ENVELOPE: json.dumps(env, sort_keys=True, separators=(",", ":"))},
    })


def publish(client: RegistryClient, image: Reference, subject: oci.Descriptor, kind: str,
            artifact_type: str, subjects: list[tuple[str, str]], predicate: dict[str, Any],
            *, signer_: Signer | None = None) -> str:
    """Sign a statement about ``subject`` and put it at ``sha256-<hex>.<kind>`` beside it;
    returns the artifact's digest."""
    s = signer_ or farm_signer(client.settings)
    env = envelope.seal(s, envelope.statement(subjects, artifact_type, predicate))
    repo = Reference(image.registry, image.repository)
    raw = manifest_for(env, artifact_type, subject)
    tagged = Reference(image.registry, image.repository, tag_for(subject.digest, kind))
    _ensure_empty(client, repo)
    try:
        return client.put_manifest(tagged, raw, oci.OCI_MANIFEST)
    except RegistryError as exc:
        if not exc.blob_unknown:
            raise
    # another process uploaded the empty blob at the same moment, or it was deleted
    _ensure_empty(client, repo, again=True)
    return client.put_manifest(tagged, raw, oci.OCI_MANIFEST)


def read(client: RegistryClient, image: Reference, digest: str, kind: str, artifact_type: str,
         *, what: str, trust: TrustStore | None = None) -> dict[str, Any] | None:
    """The verified statement at ``sha256-<hex>.<kind>`` beside ``image``: None when the
    tag is absent, ``SignatureError`` (naming ``what`` and why) when it holds anything
    that is not a statement about ``digest`` signed by a trusted key."""
    tagged = Reference(image.registry, image.repository, tag_for(digest, kind))
    try:
        raw, _d, _t = client.get_raw_manifest(tagged)
    except NotFound:
        return None
    try:
        doc = json.loads(raw)
        ann = doc.get("annotations") or {}
        sub_digest = (doc.get("subject") or {}).get("digest")
    except (ValueError, AttributeError):
        raise SignatureError(f"{what} at {tagged}: not an imagefarm attestation (not a JSON manifest)") from None
    if sub_digest != digest:
        raise SignatureError(f"{what} at {tagged}: its subject is {sub_digest or 'missing'}, not {digest}")
    if ANN_ENVELOPE not in ann:
        raise SignatureError(f"{what} at {tagged}: unsigned (no DSSE envelope in it)")
    try:
        env = json.loads(ann[ANN_ENVELOPE])
    except ValueError:
        raise SignatureError(f"{what} at {tagged}: its DSSE envelope is not JSON") from None
    return envelope.open_envelope(env, trust or farm_trust(client.settings), what=f"{what} at {tagged}",
                                  predicate_type=artifact_type, subject_digest=digest)

