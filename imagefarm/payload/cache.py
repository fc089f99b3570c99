"""The payload value and its cache: ``cache_dir/payload/<recipe digest>.json`` beside ``blobs/``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefarm import oci
from imagefarm.settings import Settings
from .layer import LAYER_FORMAT
from .recipe import Recipe


@dataclass(frozen=True, slots=True)
class Payload:
    """A built payload layer and what it was built from."""

    recipe_name: str
    recipe_digest: str
    agent_server_version: str
    layer: oci.Layer
    uncompressed_size: int = 0
    python_version: str = ""
    build_seconds: float = 0.0

    @property
    def digest(self) -> str:
        return self.layer.digest

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe_name": self.recipe_name,
            "recipe_digest": self.recipe_digest,
            "agent_server_version": self.agent_server_version,
            "layer": self.layer.to_json(),
            "uncompressed_size": self.uncompressed_size,
            "python_version": self.python_version,
            "build_seconds": round(self.build_seconds, 1),
            "layer_format": LAYER_FORMAT,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Payload":
        return cls(d["recipe_name"], d["recipe_digest"], d["agent_server_version"],
                   oci.Layer.from_json(d["layer"]), int(d.get("uncompressed_size", 0)),
                   d.get("python_version", ""), float(d.get("build_seconds", 0.0)))


def payload_dir(settings: Settings) -> Path:
    return Path(settings.cache_dir) / "payload"


def record_path(settings: Settings, recipe: Recipe) -> Path:
    return payload_dir(settings) / (recipe.digest.split(":", 1)[1] + ".json")


def cached_payloads(settings: Settings) -> list[Payload]:
    """Every payload in this machine's cache whose blob is still there (``payload list``)."""
    found = []
    for rec in sorted(payload_dir(settings).glob("*.json")):
        try:
            p = Payload.from_json(json.loads(rec.read_text()))
            if p.layer.path.stat().st_size == p.layer.size:
                found.append(p)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def load_payload(settings: Settings, recipe: Recipe) -> Payload | None:
    """The cached payload of ``recipe`` or None (no record, its blob is gone, or it was
    laid out by another ``LAYER_FORMAT``)."""
    rec = record_path(settings, recipe)
    try:
        record = json.loads(rec.read_text())
        if record.get("layer_format") != LAYER_FORMAT:
            return None
        payload = Payload.from_json(record)
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    try:
        if payload.layer.path.stat().st_size != payload.layer.size:
            return None
    except OSError:
        return None
    if payload.recipe_digest != recipe.digest:
        return None
    return payload
