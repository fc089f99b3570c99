"""The farm's units of work, executor-agnostic: derive one base, verify one image.

The local pool and the Celery tasks call the same two functions, so the embedded
default and the cluster behave alike. Each returns a plain JSON-able dict (what a
result backend stores); bad input and permanent failures come back as
``{"ok": False, "error": ...}``, transient ones raise so the executor retries them.

A worker on another node may lack the payload blob: it derives by mounting the blob
from the target registry (the driver publishes it in ``<to>/imagefarm-payload``).
"""

from __future__ import annotations

import threading
from typing import Any

from . import attest
from imagefarm import oci
from imagefarm.derive import Appender, AppendPayload, PayloadLike
from imagefarm.errors import ImagefarmError, PayloadError
from imagefarm.names.reference import Reference, parse
from imagefarm.settings import Settings

_local = threading.local()
_lock = threading.Lock()
_appenders: dict[str, Appender] = {}


def appender(settings: Settings) -> Appender:
    """One Appender (pooled connections, blob memory) per process and settings."""
    key = settings.model_dump_json()
    with _lock:
        a = _appenders.get(key)
        if a is None:
            a = _appenders[key] = Appender(settings)
        return a


def payload_for(settings: Settings, recipe_name: str, layer: dict[str, Any] | None = None) -> PayloadLike:
    """The recipe's payload: the local cache, else the layer descriptor the task carries.

    The driver publishes the payload in ``<to>/imagefarm-payload`` before it submits a
    task, so a node without the blob derives by mounting it from there: nothing is
    downloaded."""
    from imagefarm.payload import load_payload
    from imagefarm.payload.remote import RemotePayload, artifact_ref
    from imagefarm.payload.recipe import recipe_for

    recipe = recipe_for(settings, recipe_name)
    local = load_payload(settings, recipe)
    if local is not None:
        return AppendPayload.of(local, recipe)
    if not layer:
        raise PayloadError(
            f"no payload for recipe {recipe.name!r} on this node and none named by the task: "
            f"run `imagefarm payload build --recipe {recipe.name}` first")
    home = artifact_ref(settings.to, recipe.digest)
    got = oci.Layer(None, layer["digest"], int(layer["size"]), layer["diff_id"],
                    layer.get("media_type", oci.OCI_LAYER_GZIP))
    _check_task_payload(settings, recipe, got)
    return RemotePayload(got, recipe.name, recipe.digest, recipe.agent_server_version, tuple(recipe.env),
                         Reference(home.registry, home.repository))


_checked: set[tuple[str, str, str, str]] = set()


def _check_task_payload(settings: Settings, recipe: Any, layer: oci.Layer) -> None:
    """A task names the payload layer to append; append it only when the payload image
    at ``<to>/imagefarm-payload`` is signed by a trusted key for exactly that layer and
    diff_id (once per process and layer): a broker message is not proof."""
    from imagefarm.payload.remote import artifact_ref, find

    key = (settings.to, recipe.digest, layer.digest, layer.diff_id)
    if key in _checked:
        return
    found = find(appender(settings).client, recipe, settings.to)  # SignatureError when unsigned
    if found is None:
        raise PayloadError(f"the task names payload {layer.digest[:19]} of recipe {recipe.name}, but "
                           f"{artifact_ref(settings.to, recipe.digest)} does not exist: refused")
    if (found.layer.digest, found.layer.diff_id) != (layer.digest, layer.diff_id):
        raise PayloadError(f"the task names payload layer {layer.digest[:19]}, but the signed payload image of "
                           f"recipe {recipe.name} holds {found.layer.digest[:19]}: refused")
    with _lock:
        _checked.add(key)


def derive_base(settings: Settings, base: str, recipe: str, layer: dict[str, Any] | None = None,
                publish: bool = True) -> dict[str, Any]:
    """Derive one base; ``ok: False`` with the reason for permanent failures.

    ``publish=False``: push by digest only; ``verify_image`` tags it once it boots."""
    try:
        # the task's strings (Celery's wire format) become values once, here
        result = appender(settings).derive(parse(base), payload_for(settings, recipe, layer), publish=publish)
    except ImagefarmError as exc:
        if exc.transient:
            raise
        return {"ok": False, "base": base, "error": str(exc), "error_type": type(exc).__name__}
    return {"ok": True, **result.to_json()}


def relayer_group(settings: Settings, bases: list[str], recipe: str, layer: dict[str, Any] | None = None,
                  publish: list[str] | None = None) -> dict[str, Any]:
    """Re-layer one repository's bases as one unit (``derive.relayer``): every image is
    pushed by digest and proven; those named in ``publish`` (not boot-checked in this
    batch) are tagged at once, the others by ``verify_image`` once they boot. A permanent
    failure fails the whole group (``ok: False``): its bases share the common layer."""
    from imagefarm.derive.relayer import Relayer

    a = appender(settings)
    try:
        group = Relayer(a).relayer([parse(b) for b in bases], payload_for(settings, recipe, layer), publish=False)
        results = []
        for r in group.results:
            now = r.base in set(publish or ()) and not r.skipped
            if now:
                a.publish(parse(r.image), r.digest)
            results.append({"ok": True, **r.to_json(), "published": r.published or now})
    except ImagefarmError as exc:
        if exc.transient:
            raise
        return {"ok": False, "bases": bases, "error": str(exc), "error_type": type(exc).__name__}
    return {"ok": True, "group": group.group, "common": group.common.digest if group.common else None,
            "results": results, "mtime_differs": group.mtime_differs}


def verify_image(settings: Settings, image: str, digest: str, timeout: float = 120.0) -> dict[str, Any]:
    """Boot-check one derived image; if it boots, publish its tag, then record the
    result in the registry (in that order: a crash in between only costs a re-verify).
    An image that does not boot is never tagged, so no lookup or runtime serves it."""
    from .verify import verify

    ref = parse(image)
    pinned = ref.with_digest(digest).pinned
    a = appender(settings)
    if attest.is_verified(a.client, ref, digest):
        a.publish(ref, digest)
        return {"ok": True, "image": image, "digest": digest, "verified": True, "skipped": True}
    try:
        result = verify(settings, pinned, timeout=timeout)
    except ImagefarmError as exc:
        if exc.transient:
            raise
        return {"ok": False, "image": image, "digest": digest, "verified": False, "error": str(exc)}
    a.publish(ref, digest)
    attest.record(a.client, ref, digest, result.to_json())
    return {"ok": True, "image": image, "digest": digest, "verified": True, "skipped": False}
