"""A small OCI distribution client over httpx: manifests, blobs, mounts, streamed copies.

Why not oras-py (``oras`` on PyPI)? It speaks the same API and its auth-header parser
is used here (``auth.parse_challenge``), but it has no cross-repository blob mount
(the whole point of the fast derive path), it reads a blob into memory to upload it
(``fd.read()``), it cannot stream a blob from one registry into another, and it is
built on ``requests`` without a per-request retry policy. This client is sync and
safe to share between the threads of a pool: one ``httpx.Client`` (HTTP/1.1
keep-alive, pooled connections), auth state behind locks, per-thread stats.

Failure policy: 5xx and dropped connections are retried by the one policy of
``transport.RetryPolicy``, then raise ``TransientRegistryError`` / ``RegistryUnreachable``;
a 429 or a spent pull budget waits at the process's rate-limit gate (``ratelimit``),
shared by every caller, uses up no retry, and raises ``RateLimited`` if the wait is
longer than ``rate_wait``;
401/403 raise ``AuthError`` saying how to log in; 404 raises ``NotFound`` quoting the
registry. Plain HTTP follows the one rule of ``Registry.insecure`` (loopback, or
``settings.insecure_registries``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import httpx

from imagefarm import oci
from imagefarm.errors import (AuthError, NotFound, RegistryError, RegistryUnreachable,
                      TransientRegistryError, UnsupportedMedia)
from imagefarm.oci import Descriptor
from imagefarm.names.reference import Reference, Repository
from imagefarm.settings import Settings
from . import manifests as mf
from . import ratelimit
from .auth import Authenticator, Challenge, Credentials, load_credentials, rejected, scope
from .cache import DIGEST, ManifestCache
from .stats import StatsSink
from .streams import CHUNK, Counted, OneShot, file_chunks, once, read_limited, rechunk
from .transport import RETRY_STATUS, RetryableStatus, RetryPolicy, http_client, registry_codes, registry_message
#: configs are small; refuse absurd ones instead of reading them into memory
CONFIG_LIMIT = 16 * 1024 * 1024
#: pages of one tag list (distribution pages 100 tags by default: a million tags)
MAX_TAG_PAGES = 10_000

Body = Callable[[], Iterable[bytes] | bytes]
BlobSource = Path | bytes | Callable[[], Iterable[bytes]] | Iterable[bytes]


@dataclass(frozen=True, slots=True)
class Resolved:
    """A reference resolved to one platform's image manifest."""

    ref: Reference
    manifest: mf.Manifest
    index: mf.Index | None = None

    @property
    def digest(self) -> str:
        return self.manifest.digest


class RegistryClient:
    """Talk to any number of registries; every method takes a ``Reference``."""

    def __init__(self, settings: Settings | None = None, *, retries: int = 5, backoff: float = 0.2,
                 max_backoff: float = 8.0, timeout: float = 60.0,
                 credentials: dict[str, Credentials] | None = None, rate_wait: float = 2.0) -> None:
        self.settings = settings or Settings.load()
        self.retry = RetryPolicy(retries, backoff, max_backoff)
        #: seconds a request may wait for a rate-limit pause before ``RateLimited`` is
        #: raised (a batch sets the base aside; a plan waits: ``math.inf``)
        self.rate_wait = rate_wait
        # a streamed cross-registry copy holds two connections (GET and PUT)
        self._http = http_client(2 * self.settings.registry_concurrency, timeout)
        creds = credentials if credentials is not None else load_credentials(self.settings.auth_file)
        self._auth = Authenticator(creds, self._fetch_token)
        self._pinged: set[str] = set()
        self._ping_lock = threading.Lock()
        self.stats = StatsSink()
        self.manifests = ManifestCache(Path(self.settings.state_dir) / "manifests")

    # -- lifecycle -------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def track(self):
        """``with client.track() as s:`` counts this thread's requests into ``s``."""
        return self.stats.track()

    def account(self, registry: str) -> str:
        """Whose pull budget requests to ``registry`` spend: the auth file's user."""
        creds = self._auth.credentials(registry)
        return creds.username if creds else "anonymous"

    # -- transport -------------------------------------------------------------
    def base_url(self, ref: Reference | Repository) -> str:
        return ref.registry.base_url(self.settings)

    def _url(self, ref: Reference, tail: str) -> str:
        return f"{self.base_url(ref)}/v2/{ref.repository}/{tail}"

    def _send(self, method: str, url: str, headers: dict[str, str], body: Body | None,
              params: dict[str, str] | None, stream: bool, follow: bool) -> httpx.Response:
        content = body() if body is not None else None
        if content is not None and not isinstance(content, (bytes, bytearray)):
            content = self._count_up(content)
        elif content is not None:
            self.stats.add(bytes_up=len(content))
        target = httpx.URL(url)
        if params:  # merge: an upload Location carries its own query (``_state``)
            target = target.copy_merge_params(params)
        req = self._http.build_request(method, target, headers=headers, content=content)
        self.stats.add(requests=1)
        resp = self._http.send(req, stream=True, follow_redirects=follow)
        if not stream:
            try:
                resp.read()
            finally:
                resp.close()
            self.stats.add(bytes_down=len(resp.content))
        return resp

    def _count_up(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for c in chunks:
            self.stats.add(bytes_up=len(c))
            yield c

    def _ensure_auth(self, ref: Reference) -> None:
        """Learn once per registry how it authenticates (``GET /v2/``), so uploads are
        sent with credentials up front and never streamed twice."""
        if ref.registry in self._pinged:
            return
        with self._ping_lock:
            if ref.registry in self._pinged:
                return
            self.ping(ref)
            self._pinged.add(ref.registry)

    def ping(self, ref: Reference) -> None:
        """``GET /v2/``: raises ``RegistryUnreachable`` if nothing answers."""
        resp = self._request("GET", ref, f"{self.base_url(ref)}/v2/", scopes=(), what="the API root",
                             ok=(200, 401), auth=False)
        if resp.status_code == 401:
            www = resp.headers.get("WWW-Authenticate", "")
            if self._auth.credentials(ref.registry) is not None or "bearer" in www.lower():
                self._auth.learn(ref.registry, www)

    def _request(self, method: str, ref: Reference, url: str, *, scopes: Sequence[str], what: str,
                 ok: Sequence[int] = (200,), headers: dict[str, str] | None = None,
                 body: Body | None = None, params: dict[str, str] | None = None,
                 stream: bool = False, follow: bool = False, retries: int | None = None,
                 auth: bool = True, missing_ok: bool = False) -> httpx.Response:
        """One logical request: auth, retries, and error mapping. Returns an ``ok`` response
        (or a 404 with ``missing_ok``); a streamed response must be closed by the caller."""
        if auth:
            self._ensure_auth(ref)
        host = ref.registry
        gate, counted, account = ratelimit.current(), ratelimit.counts(method, url), self.account(host)
        tries = 0

        def once_more() -> httpx.Response:
            nonlocal tries, counted
            while True:
                permit, seen = gate.acquire(host, account, counted, self.rate_wait), None
                try:
                    resp = self._send_authed(method, ref, url, scopes, what, headers, body, params,
                                             stream, follow, auth)
                    seen = ratelimit.observe(resp.status_code, resp.headers)
                    if counted and seen is not None:  # a registry that counts said so
                        self.stats.add(pulls=1)
                except httpx.TransportError:
                    tries += 1
                    raise
                finally:
                    gate.release(permit, seen)
                if resp.status_code != 429:
                    break
                # a spent budget: wait at the gate with every other caller (it says how
                # long); this is no failure and uses up no retry
                if stream:
                    resp.close()
                counted = True
                self.stats.add(rate_limited=1)
            tries += 1
            if resp.status_code in RETRY_STATUS:
                raise RetryableStatus(resp)
            return resp

        def before_sleep(exc: BaseException) -> None:
            self.stats.add(retries=1)
            if stream and isinstance(exc, RetryableStatus):
                exc.response.close()

        try:
            resp = self.retry.call(once_more, retries=retries, before_sleep=before_sleep,
                                   retry_on=lambda e: isinstance(e, (httpx.TransportError, RetryableStatus)))
        except RetryableStatus as exc:
            resp = exc.response  # retries ran out: mapped below
        except httpx.TransportError as exc:
            if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                raise RegistryUnreachable(
                    f"cannot reach registry {host} for {what} after {tries} tries "
                    f"({type(exc).__name__}: {exc}): is it running and is the address right?"
                    f"{'' if ref.registry.is_loopback else ' (plain HTTP registries belong in insecure_registries)'}",
                    reference=ref) from None
            raise TransientRegistryError(
                f"registry {host} dropped the connection during {what} {tries} times "
                f"({type(exc).__name__}: {exc})", reference=ref) from None
        attempt = tries - 1
        code = resp.status_code
        if code in ok or (missing_ok and code == 404):
            return resp
        if stream:
            resp.read()
            resp.close()
        msg = registry_message(resp)
        data = dict(registry_status=code, codes=registry_codes(resp), reference=ref, request=resp.request)
        if code in RETRY_STATUS:
            raise TransientRegistryError(f"registry {host} failed {what} with {code} after "
                                         f"{attempt + 1} tries: {msg}", **data)
        if code in (401, 403):
            raise AuthError(rejected(host, what, self._auth.credentials(host)) + f" (registry said: {msg})",
                            **data)
        if code == 404:
            raise NotFound(f"{what}: not found in registry {host} (registry said: {msg})", **data)
        raise RegistryError(f"registry {host} refused {what} with HTTP {code}: {msg}", **data)

    def _send_authed(self, method, ref, url, scopes, what, headers, body, params, stream, follow, auth):
        hdrs = dict(headers or {})
        # a Link or Location the registry sent may name another host: its credentials
        # go to the registry's own origin only
        auth = auth and _origin(url) == _origin(self.base_url(ref))
        if auth:
            h = self._auth.header(ref.registry, scopes)
            if h:
                hdrs["Authorization"] = h
        resp = self._send(method, url, hdrs, body, params, stream, follow)
        if resp.status_code != 401 or not auth:
            return resp
        www = resp.headers.get("WWW-Authenticate", "")
        if stream:
            resp.close()
        hdrs["Authorization"] = self._auth.challenged(ref.registry, www, scopes, what=what)
        return self._send(method, url, hdrs, body, params, stream, follow)

    def _fetch_token(self, ch: Challenge, scopes: Sequence[str], creds: Credentials | None) -> tuple[str, float]:
        params: list[tuple[str, str]] = [("service", ch.service)] if ch.service else []
        params += [("scope", s) for s in scopes]
        headers = {"Authorization": creds.basic} if creds else {}
        host = urllib.parse.urlsplit(ch.realm).netloc or ch.realm

        def once_more() -> httpx.Response:
            self.stats.add(requests=1)
            resp = self._http.get(ch.realm, params=params, headers=headers)
            if resp.status_code in RETRY_STATUS:
                raise RetryableStatus(resp)
            return resp

        try:
            resp = self.retry.call(once_more, retry_on=lambda e: isinstance(e, (httpx.TransportError, RetryableStatus)))
        except RetryableStatus as exc:
            resp = exc.response
        except httpx.TransportError as exc:
            raise RegistryUnreachable(f"cannot reach token server {ch.realm}: {exc}") from None
        if resp.status_code in (401, 403):
            raise AuthError(rejected(ch.service or host, f"a token for {' '.join(scopes) or 'login'}", creds))
        if resp.status_code != 200:
            raise RegistryError(f"token server {ch.realm} answered {resp.status_code}: {resp.text[:200]}")
        try:
            doc = resp.json()
            token = doc.get("token") or doc["access_token"]
        except (ValueError, KeyError):
            raise RegistryError(f"token server {ch.realm} sent no token") from None
        return token, float(doc.get("expires_in") or 60)

    # -- manifests -------------------------------------------------------------
    def get_manifest(self, ref: Reference, *, scopes: Sequence[str] | None = None) -> mf.Manifest | mf.Index:
        """GET the manifest or index ``ref`` names (size-limited, digest-checked)."""
        raw, digest, ctype = self.get_raw_manifest(ref, scopes=scopes)
        return mf.parse_manifest(raw, ctype, digest=digest, where=f"manifest {ref}")

    def get_raw_manifest(self, ref: Reference, *, scopes: Sequence[str] | None = None
                         ) -> tuple[bytes, str, str | None]:
        """(bytes, digest, content type) of any manifest ``ref`` names, artifacts included
        (size-limited, digest-checked, not parsed)."""
        what = f"manifest {ref}"
        resp = self._request("GET", ref, self._url(ref, f"manifests/{ref.identifier}"),
                             scopes=scopes or (scope(ref.repository),), what=what,
                             headers={"Accept": oci.ACCEPT}, stream=True)
        try:
            size = int(resp.headers.get("Content-Length") or 0)
            if size > mf.MANIFEST_LIMIT:
                raise UnsupportedMedia(f"{what}: manifest is {size} bytes, over the "
                                       f"{mf.MANIFEST_LIMIT} byte limit")
            raw = read_limited(resp, mf.MANIFEST_LIMIT, what)
            self.stats.add(bytes_down=len(raw))
        finally:
            resp.close()
        digest = oci.sha256_digest(raw)
        if ref.digest and ref.digest != digest:
            raise RegistryError(f"{what}: registry {ref.registry} returned content with digest {digest}")
        return raw, digest, resp.headers.get("Content-Type")

    def head_manifest(self, ref: Reference, *, scopes: Sequence[str] | None = None) -> Descriptor | None:
        """Descriptor of ``ref`` (digest from Docker-Content-Digest) or None if absent."""
        resp = self._request("HEAD", ref, self._url(ref, f"manifests/{ref.identifier}"),
                             scopes=scopes or (scope(ref.repository),), what=f"manifest {ref}",
                             headers={"Accept": oci.ACCEPT}, missing_ok=True)
        if resp.status_code == 404:
            return None
        return Descriptor(resp.headers.get("Content-Type", "").split(";")[0],
                          resp.headers.get("Docker-Content-Digest", ""),
                          int(resp.headers.get("Content-Length") or 0))

    def resolve(self, ref: Reference, platform: str | None = None, *,
                scopes: Sequence[str] | None = None, head_first: bool = False) -> Resolved:
        """The image manifest ``ref`` means on ``platform`` (indexes resolved).

        ``head_first`` (for a source registry that counts GETs): HEAD the tag, which is
        not counted, and take the bytes from the manifest cache when that digest was
        read before, so each manifest costs one counted GET, ever."""
        got = self._read(ref, scopes, head_first)
        if isinstance(got, mf.Manifest):
            return Resolved(ref, got)
        platform = platform or self.settings.platform
        entry = mf.select_platform(got, platform, where=f"image index {ref}")
        child = self._read(ref.with_digest(entry.digest), scopes, head_first)
        if not isinstance(child, mf.Manifest):
            raise UnsupportedMedia(f"image index {ref}: entry for {platform} is itself an index")
        return Resolved(ref, child, got)

    def _read(self, ref: Reference, scopes: Sequence[str] | None, cached: bool) -> mf.Manifest | mf.Index:
        if not cached:
            return self.get_manifest(ref, scopes=scopes)
        digest = ref.digest
        if digest is None:
            desc = self.head_manifest(ref, scopes=scopes)
            if desc is None:
                raise NotFound(f"manifest {ref}: not found in registry {ref.registry}")
            digest = desc.digest if DIGEST.fullmatch(desc.digest or "") else None  # a header, unchecked
        got = self.manifests.get(digest, f"manifest {ref}") if digest else None
        if got is None:
            got = self.get_manifest(ref.with_digest(digest) if digest else ref, scopes=scopes)
            self.manifests.put(got)
        return got

    def put_manifest(self, ref: Reference, raw: bytes, media_type: str, *,
                     scopes: Sequence[str] | None = None) -> str:
        """PUT a manifest under ``ref``'s tag (or digest); returns its digest."""
        resp = self._request("PUT", ref, self._url(ref, f"manifests/{ref.identifier}"),
                             scopes=scopes or (scope(ref.repository, True),), what=f"push of manifest {ref}",
                             headers={"Content-Type": media_type}, body=lambda: raw, ok=(201, 200))
        return resp.headers.get("Docker-Content-Digest") or oci.sha256_digest(raw)

    def list_tags(self, repo: Repository | Reference, *, page_size: int | None = None) -> list[str]:
        """Every tag of the repository (a ``Reference`` means its repository), following
        ``Link: <...>; rel="next"`` pages.

        A ``Link`` seen before (a registry pointing a page at itself) or more than
        ``MAX_TAG_PAGES`` pages is a ``RegistryError``, never an endless loop."""
        repo = repo.repo if isinstance(repo, Reference) else repo
        url: str | None = f"{self.base_url(repo)}/v2/{repo.path}/tags/list"
        params = {"n": str(page_size)} if page_size else None
        tags: list[str] = []
        seen: set[str] = set()
        while url:
            if url in seen or len(seen) >= MAX_TAG_PAGES:
                why = "links back to a page already read" if url in seen else f"has over {MAX_TAG_PAGES} pages"
                raise RegistryError(f"tag list of {repo.name} on {repo.registry} {why} ({url}): "
                                    "the registry's pagination is broken")
            seen.add(url)
            resp = self._request("GET", repo, url, scopes=(scope(repo.path),),
                                 what=f"tag list of {repo.name}", params=params)
            tags += resp.json().get("tags") or []
            url, params = _next_link(resp, self.base_url(repo)), None
        return tags

    # -- blobs -----------------------------------------------------------------
    def blob_exists(self, ref: Reference, digest: str, *, scopes: Sequence[str] | None = None) -> bool:
        resp = self._request("HEAD", ref, self._url(ref, f"blobs/{digest}"),
                             scopes=scopes or (scope(ref.repository),), what=f"blob {digest[:19]} in {ref.name}",
                             missing_ok=True, follow=True)
        return resp.status_code == 200

    def get_blob_bytes(self, ref: Reference, digest: str, *, limit: int = CONFIG_LIMIT,
                       scopes: Sequence[str] | None = None) -> bytes:
        """A small blob (a config) in memory, size-limited and digest-checked."""
        what = f"blob {digest[:19]} of {ref.name}"
        with self.open_blob(ref, digest, scopes=scopes) as chunks:
            buf = bytearray()
            for c in chunks:
                buf += c
                if len(buf) > limit:
                    raise UnsupportedMedia(f"{what}: larger than {limit} bytes")
        data = bytes(buf)
        if oci.sha256_digest(data) != digest:
            raise RegistryError(f"{what}: content does not match its digest")
        return data

    @contextlib.contextmanager
    def open_blob(self, ref: Reference, digest: str, *, scopes: Sequence[str] | None = None
                  ) -> Iterator[Iterator[bytes]]:
        """Stream a blob (redirects to storage followed); yields an iterator of chunks."""
        resp = self._request("GET", ref, self._url(ref, f"blobs/{digest}"),
                             scopes=scopes or (scope(ref.repository),),
                             what=f"blob {digest[:19]} of {ref.name}", stream=True, follow=True)
        try:
            yield self._count_down(resp.iter_raw(CHUNK))
        finally:
            resp.close()

    def _count_down(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for c in chunks:
            self.stats.add(bytes_down=len(c))
            yield c

    def mount_blob(self, ref: Reference, digest: str, from_repo: str, *,
                   scopes: Sequence[str] | None = None) -> tuple[bool, str | None]:
        """Cross-repository mount within one registry: (True, None) if mounted, else
        (False, upload location) -- the registry opened an upload session instead."""
        scopes = scopes or (scope(ref.repository, True), scope(from_repo))
        resp = self._request("POST", ref, self._url(ref, "blobs/uploads/"), scopes=scopes,
                             what=f"mount of blob {digest[:19]} from {from_repo} into {ref.name}",
                             params={"mount": digest, "from": from_repo}, ok=(201, 202))
        if resp.status_code == 201:
            self.stats.add(blobs_mounted=1)
            return True, None
        return False, self._location(ref, resp)

    def start_upload(self, ref: Reference, *, scopes: Sequence[str] | None = None) -> str:
        resp = self._request("POST", ref, self._url(ref, "blobs/uploads/"),
                             scopes=scopes or (scope(ref.repository, True),),
                             what=f"blob upload to {ref.name}", ok=(202,))
        return self._location(ref, resp)

    def _location(self, ref: Reference, resp: httpx.Response) -> str:
        loc = resp.headers.get("Location")
        if not loc:
            raise RegistryError(f"registry {ref.registry} opened an upload without a Location header")
        return urllib.parse.urljoin(self.base_url(ref) + "/", loc)

    def upload_blob(self, ref: Reference, digest: str, source: BlobSource, *, size: int | None = None,
                    chunk_size: int | None = None, location: str | None = None,
                    scopes: Sequence[str] | None = None) -> None:
        """Upload a blob streamed from a file, bytes, an iterator, or a factory of
        iterators (a factory or a file can be replayed: a transient failure restarts the
        upload in a fresh session). ``chunk_size`` switches to PATCH-chunked upload."""
        scopes = scopes or (scope(ref.repository, True),)
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            size = path.stat().st_size if size is None else size
            factory: Callable[[], Iterable[bytes]] = lambda: file_chunks(path)
        elif isinstance(source, (bytes, bytearray)):
            data = bytes(source)
            size = len(data)
            factory = lambda: [data]
        elif callable(source):
            factory = source
        else:
            factory = OneShot(source)
        session = [location]

        def whole_upload() -> None:
            loc = session.pop() or self.start_upload(ref, scopes=scopes)
            session.append(None)  # a restart needs a fresh session
            counted = Counted(factory())
            if chunk_size:
                self._put_chunked(ref, digest, counted, loc, chunk_size, scopes)
            else:
                headers = {"Content-Type": "application/octet-stream"}
                if size is not None:
                    headers["Content-Length"] = str(size)
                self._request("PUT", ref, loc, scopes=scopes, what=f"upload of blob {digest[:19]} to {ref.name}",
                              headers=headers, body=once(counted), params={"digest": digest},
                              ok=(201, 204), retries=0)
            self.stats.add(blobs_uploaded=1, blob_bytes_uploaded=counted.n)

        # a transient failure restarts the whole upload, unless its source cannot be replayed
        self.retry.call(whole_upload, before_sleep=lambda e: self.stats.add(retries=1),
                        retry_on=lambda e: isinstance(e, (TransientRegistryError, RegistryUnreachable))
                        and not isinstance(factory, OneShot))

    def _put_chunked(self, ref, digest, chunks, loc, chunk_size, scopes) -> None:
        offset = 0
        what = f"chunked upload of blob {digest[:19]} to {ref.name}"
        for piece in rechunk(chunks, chunk_size):
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(piece)),
                       "Content-Range": f"{offset}-{offset + len(piece) - 1}"}
            resp = self._request("PATCH", ref, loc, scopes=scopes, what=what, headers=headers,
                                 body=lambda p=piece: p, ok=(202,), retries=0)
            loc = self._location(ref, resp)
            offset += len(piece)
        self._request("PUT", ref, loc, scopes=scopes, what=what, params={"digest": digest},
                      headers={"Content-Length": "0"}, ok=(201, 204), retries=0)

    def copy_blob(self, src: Reference, dst: Reference, desc: Descriptor, *, location: str | None = None,
                  scopes: Sequence[str] | None = None) -> None:
        """Stream a blob from one registry into another (GET piped into PUT, never
        whole in memory); a dropped transfer restarts from a fresh GET."""
        stack: list[contextlib.ExitStack] = []

        def open_source() -> Iterator[bytes]:
            while stack:
                stack.pop().close()
            es = contextlib.ExitStack()
            stack.append(es)
            return es.enter_context(self.open_blob(src, desc.digest))

        try:
            self.upload_blob(dst, desc.digest, open_source, size=desc.size, location=location, scopes=scopes)
        finally:
            while stack:
                stack.pop().close()


def _origin(url: str) -> tuple[str, str, int | None]:
    u = httpx.URL(url)
    return u.scheme, u.host, u.port


def _next_link(resp: httpx.Response, base: str) -> str | None:
    link = resp.headers.get("Link", "")
    for part in link.split(","):
        if 'rel="next"' in part and "<" in part:
            return urllib.parse.urljoin(base + "/", part[part.index("<") + 1:part.index(">")])
    return None
