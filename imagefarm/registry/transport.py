"""The registry client's transport: its pooled httpx client, the ONE retry policy, and
how a registry's error response reads (go-containerregistry's ``remote/transport``).

Every retried call of the client goes through ``RetryPolicy.call``: requests (429, 5xx,
dropped connections), token fetches, and whole blob uploads restarted in a fresh session.
The wait is exponential backoff with jitter, capped at ``max_backoff``; a numeric
``Retry-After`` on a 429/5xx answer is honoured (capped too). Change retry behaviour here.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx
import tenacity

from imagefarm import __version__

#: answers worth another try
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})

T = TypeVar("T")


class RetryableStatus(Exception):
    """An answer in ``RETRY_STATUS``, raised inside a try so the policy retries it."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.status_code)
        self.response = response


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retries: int = 5          # tries after the first
    backoff: float = 0.2      # first wait, doubled per retry
    max_backoff: float = 8.0

    def wait(self, state: tenacity.RetryCallState) -> float:
        delay = min(self.max_backoff, self.backoff * (2 ** (state.attempt_number - 1)))
        delay = delay / 2 + random.uniform(0, delay / 2)
        resp = getattr(state.outcome.exception(), "response", None) if state.outcome else None
        if resp is not None and resp.headers.get("Retry-After", "").isdigit():
            delay = min(self.max_backoff, float(resp.headers["Retry-After"]))
        return delay

    def call(self, fn: Callable[[], T], *, retry_on: Callable[[BaseException], bool],
             retries: int | None = None, before_sleep: Callable[[BaseException], None] | None = None) -> T:
        """``fn()`` until it returns or raises something ``retry_on`` refuses, at most
        ``1 + retries`` times; the last exception is re-raised as it is."""
        return tenacity.Retrying(
            stop=tenacity.stop_after_attempt(1 + (self.retries if retries is None else retries)),
            wait=self.wait,
            retry=tenacity.retry_if_exception(retry_on),
            before_sleep=(lambda s: before_sleep(s.outcome.exception())) if before_sleep else None,
            sleep=time.sleep,
            reraise=True,
        )(fn)


def http_client(max_connections: int, timeout: float) -> httpx.Client:
    """One pooled HTTP/1.1 keep-alive client for all registries, safe to share between threads."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.Client(
        timeout=httpx.Timeout(timeout, connect=10.0, pool=600.0),
        # TCP_NODELAY: headers and body go out in two writes; Nagle plus a delayed
        # ACK can hold a small PUT body back for tens of milliseconds
        transport=httpx.HTTPTransport(limits=limits, socket_options=[
            (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]),
        follow_redirects=False,
        # registries log it: what imagefarm moved is told apart from podman's pulls
        headers={"User-Agent": f"imagefarm/{__version__}"},
    )


def registry_codes(resp: httpx.Response) -> tuple[str, ...]:
    """The registry's error codes (``BLOB_UNKNOWN``, ``MANIFEST_BLOB_UNKNOWN``...), if it sent JSON errors."""
    try:
        return tuple(str(e.get("code")) for e in resp.json().get("errors") or () if e.get("code"))
    except (ValueError, AttributeError):
        return ()


def registry_message(resp: httpx.Response) -> str:
    """The registry's own words: ``CODE: message`` from its JSON errors, else the body."""
    try:
        errors = resp.json().get("errors") or []
        if errors:
            return "; ".join(f"{e.get('code', '?')}: {e.get('message', '')}".strip() for e in errors)
    except (ValueError, AttributeError):
        pass
    text = (resp.text or "").strip()
    return text[:300] or f"HTTP {resp.status_code} with no body"
