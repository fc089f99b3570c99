"""Turn a base image into an agent-server image.

``append`` is the fast path (manifest surgery: mount base blobs, append the payload
layer, put a new manifest); ``build`` is the buildah path for recipes with RUN steps;
``relayer`` re-layers a group of one repository's bases so their shared files are
pulled once. All name the result with ``imagefarm.names.tags`` and return a ``DeriveResult``.
"""

from __future__ import annotations

from .append import Appender, derive
from .values import AppendPayload, DeriveResult, PayloadLike

__all__ = ["AppendPayload", "Appender", "DeriveResult", "PayloadLike", "derive"]
