"""A stand-in for a rate-limited public registry: Docker Hub's pull limit in front of a
local docker-registry, for tests and bench (Docker Hub itself is never contacted).

It answers the way Docker Hub does: ``GET /v2/`` challenges for a bearer token from its
own ``/token`` endpoint (anonymous, or a user from ``users`` by basic auth); every
manifest GET is counted against the caller's account (anonymous callers share one
budget, as they share an address on Hub) in a sliding window of ``window`` seconds;
manifest responses carry ``RateLimit-Limit: N;w=W`` and ``RateLimit-Remaining: M;w=W``;
HEAD and blob GETs are not counted; past the budget a manifest GET gets 429
``TOOMANYREQUESTS``. Everything else is passed to the upstream registry as is, blobs
streamed.

``log`` is its own record of every request (time, method, path, account, counted,
status, bytes sent): tests read what was really sent from it, never from the client.
"""

from __future__ import annotations

import base64
import collections
import re
import secrets
import threading
import time
from dataclasses import dataclass
import httpx

from imagefarm.host.services import free_port

_MANIFEST = re.compile(r"^/v2/(.+)/manifests/[^/]+$")
TOO_MANY = (b'{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit. '
            b'You may increase the limit by authenticating and upgrading: '
            b'https://www.docker.com/increase-rate-limit"}]}')


@dataclass(frozen=True)
class Hit:
    t: float          #: time.time() when the request arrived
    method: str
    path: str
    account: str
    counted: bool     #: a manifest GET (counted whether it was served or refused)
    status: int
    sent: int         #: response body bytes sent
    remaining: int | None = None  #: the budget the answer reported (manifests only)
    t_end: float = 0.0            #: time.time() when the answer was sent whole


class RateLimitedRegistry:
    """Docker-Hub-like pull limits in front of ``upstream`` (``http://127.0.0.1:PORT``)."""

    def __init__(self, upstream: str, *, limit: int = 10, window: float = 6.0,
                 users: dict[str, tuple[str, int]] | None = None) -> None:
        """``users``: name -> (password, limit) for accounts with a higher limit."""
        self.upstream, self.limit, self.window = upstream.rstrip("/"), limit, window
        self.users = dict(users or {})
        self.log: list[Hit] = []
        self._tokens: dict[str, str] = {}
        self._served: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()
        self.port = free_port()
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> "RateLimitedRegistry":
        import uvicorn

        config = uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="ratelimited-registry")
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"rate-limited stand-in did not start on {self.host}")
            time.sleep(0.02)
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(10)
            self._server = None

    def __enter__(self) -> "RateLimitedRegistry":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what was sent ---------------------------------------------------------
    def counted(self, account: str | None = None) -> list[Hit]:
        with self._lock:
            return [h for h in self.log if h.counted and (account is None or h.account == account)]

    def max_in_window(self, account: str | None = None) -> int:
        """The most counted requests that arrived within any ``window`` seconds."""
        times = sorted(h.t for h in self.counted(account))
        best, lo = 0, 0
        for hi, t in enumerate(times):
            while t - times[lo] >= self.window:
                lo += 1
            best = max(best, hi - lo + 1)
        return best

    def max_concurrent(self, method: str = "GET", part: str = "/blobs/") -> int:
        """The most streamed answers (blob GETs) that were in flight at once."""
        edges = sorted([(h.t, 1) for h in self.log if h.method == method and part in h.path and h.t_end]
                       + [(h.t_end, -1) for h in self.log if h.method == method and part in h.path and h.t_end])
        best = cur = 0
        for _, d in edges:
            cur += d
            best = max(best, cur)
        return best

    def limit_of(self, account: str) -> int:
        return self.users[account][1] if account in self.users else self.limit

    # -- the app ---------------------------------------------------------------
    def _account(self, authorization: str) -> str | None:
        if authorization.startswith("Bearer "):
            return self._tokens.get(authorization[7:])
        return None

    def _budget(self, account: str, count: bool) -> tuple[bool, int]:
        """(allowed, remaining after this request) in the sliding window."""
        limit = self.limit_of(account)
        with self._lock:
            served = self._served[account]
            now = time.time()
            while served and now - served[0] >= self.window:
                served.popleft()
            if not count:
                return True, limit - len(served)
            if len(served) >= limit:
                return False, 0
            served.append(now)
            return True, limit - len(served)

    def _record(self, hit: Hit) -> None:
        with self._lock:
            self.log.append(hit)

    def _app(self):
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response, StreamingResponse
        from starlette.routing import Route

        client = httpx.AsyncClient(base_url=self.upstream, timeout=120)
        challenge = {"WWW-Authenticate": f'Bearer realm="http://{self.host}/token",service="ratelimited-standin"'}

        async def token(request: Request) -> Response:
            account = "anonymous"
            auth = request.headers.get("Authorization", "")
            if auth.startswith("Basic "):
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                if user not in self.users or not secrets.compare_digest(self.users[user][0], password):
                    return Response(b'{"details":"incorrect username or password"}', 401)
                account = user
            tok = secrets.token_hex(16)
            self._tokens[tok] = account
            return Response(f'{{"token":"{tok}","expires_in":300}}'.encode(), 200,
                            media_type="application/json")

        async def proxy(request: Request) -> Response:
            path, method = request.url.path, request.method
            account = self._account(request.headers.get("Authorization", ""))
            if account is None:
                self._record(Hit(time.time(), method, path, "-", False, 401, 0))
                return Response(b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                                401, headers=challenge, media_type="application/json")
            is_manifest = _MANIFEST.match(path) is not None
            counted = is_manifest and method == "GET"
            t = time.time()
            ok, remaining = self._budget(account, counted)
            limit = self.limit_of(account)
            quota = {"RateLimit-Limit": f"{limit};w={self.window:g}",
                     "RateLimit-Remaining": f"{remaining};w={self.window:g}",
                     "Docker-RateLimit-Source": account} if is_manifest else {}
            left = remaining if is_manifest else None
            if not ok:
                self._record(Hit(t, method, path, account, True, 429, len(TOO_MANY), 0))
                return Response(TOO_MANY, 429, headers=quota, media_type="application/json")
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() not in ("host", "authorization", "connection", "content-length")}
            body = await request.body()
            req = client.build_request(method, path, params=request.query_params, headers=headers,
                                       content=body or None)
            up = await client.send(req, stream=True, follow_redirects=True)
            out = {k: v for k, v in up.headers.items()
                   if k.lower() not in ("connection", "transfer-encoding", "content-encoding", "keep-alive")}
            out.update(quota)
            if "location" in up.headers:
                out["location"] = up.headers["location"].replace(self.upstream, f"http://{self.host}")
            sent = [0]

            async def chunks():
                try:
                    async for c in up.aiter_raw():
                        sent[0] += len(c)
                        yield c
                finally:
                    await up.aclose()
                    self._record(Hit(t, method, path, account, counted, up.status_code, sent[0], left,
                                     time.time()))

            if method == "HEAD" or is_manifest:  # small: logged before the answer goes out
                data = b"" if method == "HEAD" else await up.aread()
                await up.aclose()
                self._record(Hit(t, method, path, account, counted, up.status_code, len(data), left))
                return Response(data, up.status_code, headers=out)
            return StreamingResponse(chunks(), up.status_code, headers=out)

        return Starlette(routes=[
            Route("/token", token, methods=["GET"]),
            Route("/{path:path}", proxy, methods=["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE"]),
        ])
