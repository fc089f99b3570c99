"""API-key auth and body limits shared by the lookup API and the runtime server.

``protect(app, key=..., open_paths=..., max_body=...)`` installs an ASGI middleware
that runs before routing: the key travels in ``X-API-Key`` and is compared in
constant time from the request headers alone, so a request without the right key is a
401 before a single body byte is read (a 1 GB unauthenticated POST costs nothing),
and an authenticated body over ``max_body`` is a 413. A missing or wrong key never
comes back in an answer, and keys are never logged. Validation errors (422) name
the field and the rule, never the value sent (an environment value may be a secret).
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Awaitable, Callable, Iterable

from imagefarm.errors import ConfigError

HEADER = "X-API-Key"
#: paths every FastAPI app serves for its own documentation (no data behind them)
DOC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def key_matches(sent: str | None, expected: str) -> bool:
    """Constant-time comparison; an empty key (sent or expected) never matches."""
    if not sent or not expected:
        return False
    return hmac.compare_digest(sent.encode(), expected.encode())


def check_key_config(api_key: str | None, disable_auth: bool, variable: str = "") -> str | None:
    """The key a server runs with: required unless auth is disabled explicitly."""
    if api_key and disable_auth:
        raise ConfigError("--api-key and --disable-auth exclude each other")
    if disable_auth:
        return None
    if api_key is not None and not api_key:
        raise ConfigError("the API key is empty: set a non-empty key, or run with --disable-auth explicitly")
    if not api_key:
        raise ConfigError(f"an API key is required (--api-key{' or ' + variable if variable else ''}), "
                          "or run with --disable-auth explicitly")
    return api_key


class Guard:
    """ASGI middleware: key check on the headers, then a capped body."""

    def __init__(self, app: Any, *, key: str | None, open_paths: Iterable[str], max_body: int) -> None:
        self.app, self.key, self.open_paths, self.max_body = app, key, frozenset(open_paths), max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.key is not None and scope["path"] not in self.open_paths:
            if not key_matches(headers.get(HEADER.lower()), self.key):
                return await _reply(send, 401, f"missing or wrong API key: send it in the {HEADER} header",
                                    {"WWW-Authenticate": HEADER})
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await _reply(send, 400, "Content-Length is not a number")
            if int(length) > self.max_body:
                return await _reply(send, 413, self._too_big())
            return await self.app(scope, receive, send)
        if "chunked" not in headers.get("transfer-encoding", "").lower():
            return await self.app(scope, receive, send)
        # a chunked body: read it up to the cap, then hand the app what was read
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            size += len(msg.get("body", b""))
            if size > self.max_body:
                return await _reply(send, 413, self._too_big())
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        body, sent = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_big(self) -> str:
        return f"request body over {self.max_body} bytes: this server accepts at most that"


async def _reply(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """Answer at once and close the connection (the body, if any, is never read)."""
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close")]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def safe_errors(errors: Iterable[Any]) -> list[dict[str, Any]]:
    """Validation errors as a 422 may show them: where and what kind, never the value
    refused (pydantic's ``input`` and ``ctx`` are dropped; a body may hold secrets)."""
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]


def protect(app: Any, *, key: str | None, open_paths: Iterable[str], max_body: int) -> None:
    """Install the guard and a 422 handler that never echoes input on a FastAPI app.

    ``open_paths`` (plus ``DOC_PATHS``) need no key; ``app.state.open_paths`` keeps
    them, so tests can walk ``app.routes`` and expect 401 everywhere else."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    opened = frozenset(open_paths) | DOC_PATHS
    app.state.open_paths = opened

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Any, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": safe_errors(exc.errors())}, status_code=422)

    app.add_middleware(Guard, key=key, open_paths=opened, max_body=max_body)
