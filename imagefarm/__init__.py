"""imagefarm: prebuilt OpenHands agent-server images for every R2E-Gym base.

``__all__`` is the public surface a caller may use; each name is imported on first use
(``import imagefarm`` stays cheap). The map of subpackages is imagefarm/README.md.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_SURFACE = {
    # names and values
    "Registry": "imagefarm.names.reference", "Repository": "imagefarm.names.reference",
    "Prefix": "imagefarm.names.reference", "Reference": "imagefarm.names.reference",
    "parse": "imagefarm.names.reference", "Settings": "imagefarm.settings",
    # errors
    "ImagefarmError": "imagefarm.errors", "ConfigError": "imagefarm.errors",
    "InvalidReference": "imagefarm.errors", "RegistryError": "imagefarm.errors", "NotFound": "imagefarm.errors",
    "DeriveError": "imagefarm.errors", "PayloadError": "imagefarm.errors", "VerifyError": "imagefarm.errors",
    "http_status": "imagefarm.errors",
    # verbs
    "RegistryClient": "imagefarm.registry", "Appender": "imagefarm.derive", "AppendPayload": "imagefarm.derive",
    "DeriveResult": "imagefarm.derive", "build_payload": "imagefarm.payload",
    "load_payload": "imagefarm.payload", "recipe_for": "imagefarm.payload.recipe",
    "run_batch": "imagefarm.farm.prebuild", "verify": "imagefarm.farm.verify", "Lockfile": "imagefarm.farm.lockfile",
    "Lookup": "imagefarm.serve.lookup",
}

__all__ = ["__version__", *_SURFACE]


def __getattr__(name: str) -> Any:
    if name in _SURFACE:
        value = getattr(import_module(_SURFACE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'imagefarm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SURFACE))
