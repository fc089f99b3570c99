"""API-key auth shared by the lookup API and the runtime server.

The key travels in ``X-API-Key`` and is compared in constant time. A missing or
wrong key is a 401 that never echoes what was sent; keys are never logged.
"""

from __future__ import annotations

import hmac
from typing import Callable

from fastapi import HTTPException, Request

HEADER = "X-API-Key"


def key_matches(sent: str | None, expected: str) -> bool:
    return sent is not None and hmac.compare_digest(sent.encode(), expected.encode())


def require_key(expected: str | None) -> Callable[[Request], None]:
    """A FastAPI dependency: no-op when ``expected`` is None (auth disabled)."""

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
