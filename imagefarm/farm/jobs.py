"""The farm's units of work, executor-agnostic: derive one base, verify one image.

The local pool and the Celery tasks call the same two functions, so the embedded
default and the cluster behave alike. Each returns a plain JSON-able dict (what a
result backend stores); bad input and permanent failures come back as
``{"ok": False, "error": ...}``, transient ones raise so the executor retries them.

A worker on another node may lack the payload blob: it is fetched once from the
target registry (derive keeps it in ``<to>/imagefarm-payload``), digest-checked.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from . import attest
from imagefarm import oci
from imagefarm.derive import Appender, AppendPayload
from imagefarm.derive.append import payload_home
from imagefarm.errors import ImagefarmError, PayloadError
from imagefarm.names.reference import parse
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


def payload_for(settings: Settings, recipe_name: str, layer: dict[str, Any] | None = None) -> AppendPayload:
    """The recipe's payload: local cache, else fetched from the target registry."""
    from imagefarm.payload import load_payload
    from imagefarm.payload.recipe import recipe_for

    recipe = recipe_for(settings, recipe_name)
    local = load_payload(settings, recipe)
    if local is not None:
        return AppendPayload.of(local, recipe)
    if not layer:
        raise PayloadError(
            f"no payload for recipe {recipe.name!r} on this node and none named by the task: "
            f"run `imagefarm payload build --recipe {recipe.name}` first")
    path = fetch_blob(settings, layer["digest"], int(layer["size"]))
    got = oci.Layer(path, layer["digest"], int(layer["size"]), layer["diff_id"])
    return AppendPayload(got, recipe.name, recipe.digest, recipe.agent_server_version, tuple(recipe.env))


def fetch_blob(settings: Settings, digest: str, size: int) -> Path:
    """Download the payload blob from ``<to>/imagefarm-payload`` into the cache."""
    blobs = Path(settings.cache_dir) / "payload" / "blobs"
    final = blobs / digest.replace(":", "-")
    if final.exists() and final.stat().st_size == size:
        return final
    blobs.mkdir(parents=True, exist_ok=True)
    home = parse(f"{settings.to.rstrip('/')}/x:x").registry + "/" + payload_home(settings.to)
    ref = parse(f"{home}@{digest}")
    client = appender(settings).client
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=blobs, prefix=".fetch-")
    try:
        with os.fdopen(fd, "wb") as out, client.open_blob(ref, digest) as chunks:
            for chunk in chunks:
                h.update(chunk)
                out.write(chunk)
        if "sha256:" + h.hexdigest() != digest:
            raise PayloadError(f"payload blob fetched from {home} does not match {digest}")
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return final


def derive_base(settings: Settings, base: str, recipe: str, layer: dict[str, Any] | None = None,
                publish: bool = True) -> dict[str, Any]:
    """Derive one base; ``ok: False`` with the reason for permanent failures.

    ``publish=False``: push by digest only; ``verify_image`` tags it once it boots."""
    try:
        result = appender(settings).derive(base, payload_for(settings, recipe, layer), publish=publish)
    except ImagefarmError as exc:
        if exc.transient:
            raise
        return {"ok": False, "base": base, "error": str(exc), "error_type": type(exc).__name__}
    return {"ok": True, **result.to_json()}


def verify_image(settings: Settings, image: str, digest: str, timeout: float = 120.0) -> dict[str, Any]:
    """Boot-check one derived image; if it boots, publish its tag, then record the
    result in the registry (in that order: a crash in between only costs a re-verify).
    An image that does not boot is never tagged, so no lookup or runtime serves it."""
    from .verify import verify

    ref = parse(image)
    pinned = f"{ref.name}@{digest}"
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
