"""The payload kept in a registry: pushed once, found by recipe digest, used by mount.

A cluster user cannot build the payload as root, and should not have to build it at
all: ``push`` publishes it beside the blob's home repository (``<to>/imagefarm-payload``)
as a small OCI artifact tagged ``sha256-<recipe hex>``: the layer blob itself, plus a
config blob holding what a derive needs (layer digest, diff_id, size, recipe identity).
``find`` reads that manifest and config (two small GETs) and returns a
``RemotePayload`` whose layer has no local file: derive then mounts the blob from its
home, and no payload byte is downloaded.

::

    <registry>/<prefix>/imagefarm-payload:sha256-<recipe hex>   (artifactType PAYLOAD_TYPE)
      config  CONFIG_TYPE  {"recipe_digest", "layer": {digest, size, diff_id, media_type}, ...}
      layers  [the payload layer, tar+gzip]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable

from .. import oci
from ..derive.append import payload_home
from ..errors import NotFound, PayloadError, UnsupportedMedia
from ..recipe import Recipe
from ..reference import Reference, parse
from ..registry import RegistryClient
from ..registry.manifests import Manifest

PAYLOAD_TYPE = "application/vnd.dev.imagefarm.payload.v1"
CONFIG_TYPE = "application/vnd.dev.imagefarm.payload.config.v1+json"
ANN_DIFF_ID = "dev.imagefarm.payload.diff-id"


def artifact_ref(prefix: str, recipe_digest: str) -> Reference:
    """Where the payload of ``recipe_digest`` is published under registry ``prefix``."""
    registry = parse(f"{prefix.rstrip('/')}/x:x").registry
    return Reference(registry, payload_home(prefix), recipe_digest.replace(":", "-"))


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
    config = oci.canonical_json(_config(payload))
    config_digest = oci.sha256_digest(config)
    if not client.blob_exists(home, config_digest):
        client.upload_blob(home, config_digest, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "artifactType": PAYLOAD_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": len(config)},
        "layers": [layer.descriptor.to_json()],
        "annotations": {
            "org.opencontainers.image.created": oci.EPOCH_ISO,
            oci.ANN_RECIPE: payload.recipe_name,
            oci.ANN_RECIPE_DIGEST: payload.recipe_digest,
            oci.ANN_AGENT_VERSION: payload.agent_server_version,
            oci.ANN_PAYLOAD_DIGEST: layer.digest,
            ANN_DIFF_ID: layer.diff_id,
        },
    }
    digest = client.put_manifest(ref, oci.canonical_json(manifest), oci.OCI_MANIFEST)
    return ref, digest, sent


def _config(payload: Any) -> dict[str, Any]:
    layer = payload.layer
    return {
        "recipe_name": payload.recipe_name,
        "recipe_digest": payload.recipe_digest,
        "agent_server_version": payload.agent_server_version,
        "python_version": getattr(payload, "python_version", ""),
        "uncompressed_size": getattr(payload, "uncompressed_size", 0),
        "layer": {"digest": layer.digest, "size": layer.size, "diff_id": layer.diff_id,
                  "media_type": layer.media_type},
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
    where = f"payload artifact {ref}"
    if not isinstance(got, Manifest) or got.config.media_type != CONFIG_TYPE or len(got.layers) != 1:
        raise UnsupportedMedia(f"{where} is not an imagefarm payload (config {getattr(got, 'config', None)})")
    try:
        cfg = json.loads(client.get_blob_bytes(ref, got.config.digest))
        lay = cfg["layer"]
        layer = oci.Layer(None, lay["digest"], int(lay["size"]), lay["diff_id"],
                          lay.get("media_type", oci.OCI_LAYER_GZIP))
    except (ValueError, KeyError, TypeError):
        raise PayloadError(f"{where}: its config is not a payload record") from None
    if cfg.get("recipe_digest") != recipe.digest or got.layers[0].digest != layer.digest:
        raise PayloadError(f"{where} names recipe {cfg.get('recipe_digest')} / layer "
                           f"{got.layers[0].digest}, not {recipe.digest} / {layer.digest}")
    return RemotePayload(layer, recipe.name, recipe.digest, recipe.agent_server_version, tuple(recipe.env),
                         Reference(ref.registry, ref.repository), cfg.get("python_version", ""),
                         int(cfg.get("uncompressed_size") or 0))


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
        f"run `imagefarm payload build --recipe {recipe.name}` here, or `imagefarm payload push --to PREFIX` "
        f"on a machine that has it (then pass --payload-from PREFIX)")
