"""API-key auth shared by the lookup API and the runtime server.

The key travels in ``X-API-Key`` and is compared in constant time. A missing or
wrong key is a 401 that never echoes what was sent; keys are never logged.
"""

from __future__ import annotations

import hmac
from typing import Callable

from fastapi import HTTPException, Request

from imagefarm.errors import ConfigError

HEADER = "X-API-Key"


def key_matches(sent: str | None, expected: str) -> bool:
    """Constant-time comparison; an empty key (sent or expected) never matches."""
    if not sent or not expected:
        return False
    return hmac.compare_digest(sent.encode(), expected.encode())


def require_key(expected: str | None) -> Callable[[Request], None]:
    """A FastAPI dependency: no-op when ``expected`` is None (auth disabled).

    An empty key is refused: it would let anyone in who sends an empty header.
    """
    if expected is not None and not expected:
        raise ConfigError("the API key is empty: set a non-empty key, or leave it unset to disable auth")

    def check(request: Request) -> None:
        if expected is None:
            return
        sent = request.headers.get(HEADER)
        if not key_matches(sent, expected):
            raise HTTPException(
                status_code=401,
                detail=f"missing or wrong API key: send it in the {HEADER} header",
                headers={"WWW-Authenticate": HEADER},
            )

    return check
