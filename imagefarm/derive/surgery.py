"""Manifest surgery as pure functions: base manifest + config + payload -> new ones.

No I/O and no clock: the same inputs give the same bytes, hence the same digest.
The result is always an OCI manifest (annotations are OCI-only); Docker v2 bases
are converted the way ``skopeo copy --format oci`` does (same layer blobs, OCI media
types), so podman, containerd and registries all read it.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from imagefarm import oci
from imagefarm.errors import DeriveError
from imagefarm.names.reference import Reference
from imagefarm.names.reference import parse as parse_ref
from imagefarm.registry.manifests import TO_OCI_LAYER, Manifest, parse_platform
from .values import PayloadLike

#: overlayfs stacks at most this many layers in containers/storage (a derived image
#: is refused before it would fail at `podman run`)
MAX_LAYERS = 127
PROTECTED_ENV = ("PATH",)


def check_base(manifest: Manifest, where: str) -> None:
    """Refuse bases derive cannot extend, saying why."""
    if manifest.foreign_layers:
        raise DeriveError(
            f"{where}: has {len(manifest.foreign_layers)} foreign/non-distributable layer(s) "
            "(e.g. Windows base layers) that cannot be mounted or copied between registries")
    if len(manifest.layers) + 1 > MAX_LAYERS:
        raise DeriveError(
            f"{where}: has {len(manifest.layers)} layers; adding the agent layer would exceed "
            f"overlayfs' limit of {MAX_LAYERS} layers per container: squash the base "
            "(e.g. `buildah build --squash`) and derive again")


def merge_env(base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """Base ``Env`` with recipe ``K=V`` items: a key already set is replaced in place."""
    out = list(base)
    where = {item.split("=", 1)[0]: i for i, item in enumerate(out)}
    for item in extra:
        key = item.split("=", 1)[0]
        if "=" not in item or not key:
            raise DeriveError(f"recipe env item {item!r} is not K=V")
        if key in PROTECTED_ENV:
            raise DeriveError(
                f"recipe env sets {key}: r2e bases put their venv on {key} and tests depend on it; "
                "the agent server is started by absolute path and needs no change there")
        if key in where:
            out[where[key]] = item
        else:
            where[key] = len(out)
            out.append(item)
    return out


def annotations(base: Reference, base_digest: str, payload: PayloadLike,
                source: Reference | None = None) -> dict[str, str]:
    """``base`` is the name as the dataset gives it; ``source`` where its bytes were read
    (a mirror), recorded apart so lookups find the image by the dataset's name."""
    extra = {} if source is None or source.registry == base.registry else {
        oci.ANN_BASE_SOURCE: str(Reference(source.registry, source.repository, source.tag))}
    return {
        oci.ANN_BASE_NAME: str(Reference(base.registry, base.repository, base.tag)),
        **extra,
        oci.ANN_BASE_DIGEST: base_digest,
        oci.ANN_RECIPE: payload.recipe_name,
        oci.ANN_RECIPE_DIGEST: payload.recipe_digest,
        oci.ANN_AGENT_VERSION: payload.agent_server_version,
        oci.ANN_PAYLOAD_DIGEST: payload.layer.digest,
    }


def derived_config(base_config: Mapping[str, Any], manifest: Manifest, payload: PayloadLike,
                   labels: Mapping[str, str], *, platform: str = "linux/amd64",
                   where: str = "base") -> bytes:
    """The base config with the payload's diff_id, a history entry, recipe env and labels.

    Everything else (Env, WorkingDir, User, Cmd, Entrypoint, created, ...) is kept.
    """
    cfg = json.loads(json.dumps(base_config))  # a deep copy: the input stays untouched
    want = parse_platform(platform)
    arch = cfg.get("architecture")
    if arch and arch != want["architecture"]:
        raise DeriveError(f"{where}: is a {cfg.get('os', '?')}/{arch} image; the agent payload "
                          f"targets {platform}")
    rootfs = cfg.get("rootfs") or {}
    diff_ids = list(rootfs.get("diff_ids") or [])
    if len(diff_ids) != len(manifest.layers):
        raise DeriveError(f"{where}: config lists {len(diff_ids)} diff_ids for "
                          f"{len(manifest.layers)} layers: the base image is inconsistent")
    cfg["rootfs"] = {"type": "layers", "diff_ids": [*diff_ids, payload.layer.diff_id]}
    history = list(cfg.get("history") or [])
    history.append({
        "created": oci.EPOCH_ISO,
        "created_by": (f"imagefarm append: openhands-agent-server {payload.agent_server_version} "
                       f"(recipe {payload.recipe_name})"),
        "comment": f"payload {payload.layer.digest}",
    })
    cfg["history"] = history
    inner = dict(cfg.get("config") or {})
    if payload.env:
        inner["Env"] = merge_env(inner.get("Env") or [], payload.env)
    if labels:
        inner["Labels"] = {**(inner.get("Labels") or {}), **labels}
    cfg["config"] = inner
    return oci.canonical_json(cfg)


def derived_manifest(manifest: Manifest, config: bytes, payload: PayloadLike,
                     ann: Mapping[str, str]) -> bytes:
    """An OCI manifest: base layers (same blobs) + the payload layer + annotations."""
    layers = []
    for d in manifest.layers:
        entry = d.to_json()
        entry["mediaType"] = TO_OCI_LAYER.get(d.media_type, d.media_type)
        layers.append(entry)
    layers.append(payload.layer.descriptor.to_json())
    doc = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": oci.OCI_CONFIG, "digest": oci.sha256_digest(config), "size": len(config)},
        "layers": layers,
        "annotations": dict(ann),
    }
    return oci.canonical_json(doc)


def matches(existing: Manifest, base_digest: str, recipe_digest: str) -> bool:
    """Does an image already under the derived tag hold exactly this derive?"""
    a = existing.annotations
    return a.get(oci.ANN_BASE_DIGEST) == base_digest and a.get(oci.ANN_RECIPE_DIGEST) == recipe_digest


def names_base(ann: Mapping[str, str], base: Reference) -> int:
    """How well a derived image's annotations name ``base``: 2 the same full name (as
    the dataset gave it, or the mirror it was read through), 1 the same repository and
    tag from another registry (a mirror, another address of the same registry), 0 not it.
    A digest in ``base`` must equal the base digest recorded."""
    if base.digest and ann.get(oci.ANN_BASE_DIGEST) != base.digest:
        return 0
    best = 0
    for text in (ann.get(oci.ANN_BASE_NAME), ann.get(oci.ANN_BASE_SOURCE)):
        try:
            got = parse_ref(text) if text else None
        except ValueError:
            continue
        if got is None or got.repository != base.repository or (base.tag and got.tag != base.tag):
            continue
        best = max(best, 2 if got.registry == base.registry else 1)
    return best

