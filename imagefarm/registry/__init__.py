"""OCI registry access: a thread-safe client, auth, and manifests as values.

``RegistryClient`` speaks the API over ``transport`` (pooled client, the one retry
policy) and ``streams``; ``manifests`` parses and validates what it reads; ``auth``
finds credentials and answers challenges; ``stats`` counts the traffic.
"""

from __future__ import annotations

from .auth import Credentials, load_credentials, scope
from .client import RegistryClient, Resolved
from .manifests import Index, Manifest, parse_manifest, select_platform
from .stats import Stats

__all__ = ["Credentials", "Index", "Manifest", "RegistryClient", "Resolved", "Stats",
           "load_credentials", "parse_manifest", "scope", "select_platform"]
