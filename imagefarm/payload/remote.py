"""The payload kept in a registry: pushed once, found by recipe digest, used by mount.

A cluster user cannot build the payload as root, and should not have to build it at
all: ``push`` publishes it in the blob's home repository (``<to>/imagefarm-payload``)
as a one-layer image tagged ``sha256-<recipe hex>``: the layer blob itself and an
image config whose ``rootfs.diff_ids`` is the payload's diff_id and whose labels (and
the manifest's annotations) name the recipe. ``find`` reads that manifest and config
(two small GETs) and returns a ``RemotePayload`` whose layer has no local file: derive
then mounts the blob from its home, and no payload byte is downloaded.

An image manifest, not an OCI 1.1 artifact: distribution 2.8 has no artifact support,
and the manifest parser refuses artifacts on purpose (they cannot be derived); a
payload image is a valid image any registry and tool accepts (``skopeo inspect``).

::

    <registry>/<prefix>/imagefarm-payload:sha256-<recipe hex>
      config  image config  rootfs.diff_ids = [payload diff_id], Labels = recipe identity
      layers  [the payload layer, tar+gzip]   annotations: recipe, recipe digest, payload digest
    <registry>/<prefix>/imagefarm-payload:sha256-<manifest hex>.sig
      the signed in-toto statement (DSSE) over that manifest, its layer and diff_id

The tag and annotations are hints: ``find`` uses a payload only when a trusted key
signed exactly that manifest, layer and diff_id (``SignatureError`` otherwise, never a
miss), and ``push`` writes nothing the registry already holds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable

from imagefarm import oci
from imagefarm.derive.append import PAYLOAD_REPO
from imagefarm.errors import NotFound, PayloadError, SignatureError, UnsupportedMedia
from imagefarm.names.reference import Prefix, Reference
from imagefarm.registry import RegistryClient
from imagefarm.registry.manifests import Manifest
from imagefarm.sign import artifacts

from .recipe import Recipe

ANN_PYTHON = "dev.imagefarm.payload.python"
ANN_UNPACKED = "dev.imagefarm.payload.unpacked-size"
SIG_KIND = "sig"
SIG_TYPE = "https://imagefarm.dev/payload/v1"


def artifact_ref(prefix: Prefix | str, recipe_digest: str) -> Reference:
    """Where the payload of ``recipe_digest`` is published under registry ``prefix``."""
    prefix = prefix if isinstance(prefix, Prefix) else Prefix.parse(prefix)
    return prefix.repository(PAYLOAD_REPO).tag(recipe_digest.replace(":", "-"))


@dataclass(frozen=True, slots=True)
class RemotePayload:
    """A payload known by its descriptor only; ``source`` is the repository holding the blob."""

    layer: oci.Layer  # path is None: nothing on this machine
    recipe_name: str
    recipe_digest: str
    agent_server_version: str
    env: tuple[str, ...]
    source: Reference
    python_version: str = ""
    uncompressed_size: int = 0


def push(client: RegistryClient, payload: Any, prefix: str) -> tuple[Reference, str, bool]:
    """Publish ``payload`` (a built ``Payload``, or a ``RemotePayload`` from another
    registry) under ``prefix``; returns (artifact ref, manifest digest, blob bytes sent?).

    Idempotent: a second push is a HEAD on the blob and the same manifest bytes again."""
    ref = artifact_ref(prefix, payload.recipe_digest)
    home = Reference(ref.registry, ref.repository)
    layer: oci.Layer = payload.layer
    sent = False
    if not client.blob_exists(home, layer.digest):
        source = getattr(payload, "source", None)
        if layer.path is not None:
            client.upload_blob(home, layer.digest, layer.path, size=layer.size)
        elif source is not None and source.registry == home.registry:
            mounted, _loc = client.mount_blob(home, layer.digest, source.repository)
            if not mounted:
                client.copy_blob(source, home, layer.descriptor)
        elif source is not None:
            client.copy_blob(source, home, layer.descriptor)
        else:
            raise PayloadError(f"payload {layer.digest[:19]} has neither a local blob nor a source registry")
        sent = True
    labels = _labels(payload)
    config = oci.canonical_json({
        "architecture": "amd64", "os": "linux", "created": oci.EPOCH_ISO,
        "config": {"Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
        "history": [{"created": oci.EPOCH_ISO,
                     "created_by": f"imagefarm payload {payload.recipe_name} ({payload.recipe_digest[:19]})"}],
    })
    config_digest = oci.sha256_digest(config)
    if not client.blob_exists(home, config_digest):
        client.upload_blob(home, config_digest, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": oci.OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [layer.descriptor.to_json()],
        "annotations": {"org.opencontainers.image.created": oci.EPOCH_ISO, **labels},
    }
    raw = oci.canonical_json(manifest)
    digest = oci.sha256_digest(raw)
    have = client.head_manifest(ref)
    if have is None or have.digest != digest:
        digest = client.put_manifest(ref, raw, oci.OCI_MANIFEST)
    pinned = ref.with_digest(digest)
    try:
        signed = _signed(client, ref, digest, payload.recipe_digest, layer.digest, layer.diff_id) is not None
    except SignatureError:
        signed = False  # someone else's or a stale signature there: ours replaces it
    if not signed:
        artifacts.publish(client, ref, oci.Descriptor(oci.OCI_MANIFEST, digest, len(raw)), SIG_KIND, SIG_TYPE,
                          [(pinned.name, digest), ("layer", layer.digest), ("diff_id", layer.diff_id)],
                          {"recipe": payload.recipe_name, "recipe_digest": payload.recipe_digest,
                           "agent_server_version": payload.agent_server_version,
                           "layer": layer.digest, "diff_id": layer.diff_id})
    return ref, digest, sent


def _signed(client: RegistryClient, ref: Reference, digest: str, recipe_digest: str, layer: str,
            diff_id: str) -> dict[str, Any] | None:
    """The payload's signed statement if a trusted key vouches for exactly this manifest,
    layer, diff_id and recipe; None if unsigned; ``SignatureError`` if it says otherwise."""
    what = f"payload image {ref}"
    stmt = artifacts.read(client, ref, digest, SIG_KIND, SIG_TYPE, what=f"signature of {what}")
    if stmt is None:
        return None
    pred = stmt["predicate"]
    want = {"recipe_digest": recipe_digest, "layer": layer, "diff_id": diff_id}
    wrong = {k: pred.get(k) for k, v in want.items() if pred.get(k) != v}
    if wrong:
        raise SignatureError(f"{what}: its signed statement names {wrong}, not "
                             f"{ {k: want[k] for k in wrong} }: refused")
    return stmt


def check_signed(client: RegistryClient, ref: Reference, digest: str, recipe_digest: str, layer: str,
                 diff_id: str) -> None:
    """Refuse (``SignatureError``, one line) a payload image no trusted key signed."""
    if _signed(client, ref, digest, recipe_digest, layer, diff_id) is None:
        raise SignatureError(
            f"payload image {ref} ({digest[:19]}) is not signed by any key (no "
            f"{artifacts.tag_for(digest, SIG_KIND)} beside it): refused; publish it again with "
            "`imagefarm payload push --to PREFIX` from a machine whose key is trusted here (IMAGEFARM_TRUSTED_KEYS)")


def _labels(payload: Any) -> dict[str, str]:
    return {
        oci.ANN_RECIPE: payload.recipe_name,
        oci.ANN_RECIPE_DIGEST: payload.recipe_digest,
        oci.ANN_AGENT_VERSION: payload.agent_server_version,
        oci.ANN_PAYLOAD_DIGEST: payload.layer.digest,
        ANN_PYTHON: getattr(payload, "python_version", ""),
        ANN_UNPACKED: str(getattr(payload, "uncompressed_size", 0)),
    }


def find(client: RegistryClient, recipe: Recipe, prefix: str) -> RemotePayload | None:
    """The payload of ``recipe`` published under ``prefix``, or None if there is none.

    Nothing but the artifact's manifest and config is read; a tag holding something
    that is not this recipe's payload is an error, not a miss."""
    ref = artifact_ref(prefix, recipe.digest)
    try:
        got = client.get_manifest(ref)
    except NotFound:
        return None
    where = f"payload image {ref}"
    ann = getattr(got, "annotations", {}) or {}
    if not isinstance(got, Manifest) or len(got.layers) != 1 or oci.ANN_PAYLOAD_DIGEST not in ann:
        raise UnsupportedMedia(f"{where} is not an imagefarm payload (no {oci.ANN_PAYLOAD_DIGEST} annotation)")
    desc = got.layers[0]
    if ann.get(oci.ANN_RECIPE_DIGEST) != recipe.digest or ann[oci.ANN_PAYLOAD_DIGEST] != desc.digest:
        raise PayloadError(f"{where} names recipe {ann.get(oci.ANN_RECIPE_DIGEST)} / layer "
                           f"{ann[oci.ANN_PAYLOAD_DIGEST]}, not {recipe.digest} / {desc.digest}")
    try:
        cfg = json.loads(client.get_blob_bytes(ref, got.config.digest))
        (diff_id,) = cfg["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        raise PayloadError(f"{where}: its config does not hold the payload's one diff_id") from None
    check_signed(client, ref, got.digest, recipe.digest, desc.digest, diff_id)
    layer = oci.Layer(None, desc.digest, desc.size, diff_id, desc.media_type)
    return RemotePayload(layer, recipe.name, recipe.digest, recipe.agent_server_version, tuple(recipe.env),
                         Reference(ref.registry, ref.repository), ann.get(ANN_PYTHON, ""),
                         int(ann.get(ANN_UNPACKED) or 0))


def published(client: RegistryClient, prefix: str) -> list[dict[str, str]]:
    """The payloads published under ``prefix`` (recipe, version, digests, from each
    manifest's annotations): what ``payload list --to`` shows."""
    home = Prefix.parse(prefix).repository(PAYLOAD_REPO)
    try:
        tags = client.list_tags(home)
    except NotFound:
        return []
    out = []
    for tag in sorted(tags or ()):
        try:
            got = client.get_manifest(home.tag(tag))
        except (NotFound, UnsupportedMedia):
            continue
        ann = getattr(got, "annotations", {}) or {}
        if oci.ANN_PAYLOAD_DIGEST in ann:
            out.append({"artifact": str(home.tag(tag)), "recipe_name": ann.get(oci.ANN_RECIPE, ""),
                        "recipe_digest": ann.get(oci.ANN_RECIPE_DIGEST, ""),
                        "agent_server_version": ann.get(oci.ANN_AGENT_VERSION, ""),
                        "digest": ann[oci.ANN_PAYLOAD_DIGEST]})
    return out


def find_any(client: RegistryClient, recipe: Recipe, prefixes: Iterable[str]) -> RemotePayload | None:
    """The first of ``prefixes`` that has the payload of ``recipe``."""
    for prefix in dict.fromkeys(p for p in prefixes if p):
        hit = find(client, recipe, prefix)
        if hit is not None:
            return hit
    return None


def can_build() -> bool:
    """Whether ``derive``/``prebuild`` may build a missing payload by themselves: as root
    only (minutes of work). A normal user builds with ``imagefarm payload build`` on
    purpose, or finds the payload in a registry."""
    return os.geteuid() == 0


def locate(settings: Any, recipe: Recipe, client: RegistryClient, *, log: Any = lambda m: None) -> Any:
    """The payload ``derive``/``prebuild`` use: the local cache, else the artifact in the
    target registry (``settings.to``) or ``settings.payload_from``, else built (root
    only), else a ``PayloadError`` saying in one line what to run."""
    from . import build_payload, load_payload

    local = load_payload(settings, recipe)
    if local is not None:
        return local
    prefixes = [settings.to, settings.payload_from]
    remote = find_any(client, recipe, prefixes)
    if remote is not None:
        log(f"payload of recipe {recipe.name} found in {remote.source.name} ({remote.layer.digest[:19]}): "
            "used by mount, nothing downloaded")
        return remote
    if can_build():
        log(f"building the agent-server payload for recipe {recipe.name} (minutes the first time, cached afterwards) ...")
        return build_payload(settings, recipe, log=log)
    where = " or ".join(str(artifact_ref(p, recipe.digest)) for p in dict.fromkeys(p for p in prefixes if p))
    raise PayloadError(
        f"no payload for recipe {recipe.name} ({recipe.digest[:19]}) in this machine's cache nor at {where}: "
        f"run `imagefarm payload build --recipe {recipe.name} --agent-server-version {recipe.agent_server_version}` "
        f"here, or `imagefarm payload push --to PREFIX` "
        f"on a machine that has it (then pass --payload-from PREFIX)")
