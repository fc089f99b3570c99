"""Helpers for the registry tests: synthetic images pushed with the client under test,
and a small fault-injecting proxy in front of the real registry.

The proxy is the honest way to test retries and bearer tokens against the real
registry: it forwards every request unchanged, except that it can answer 503/429,
drop the connection, or demand a bearer token that its own /token endpoint issues.
"""

from __future__ import annotations

import base64
import http.server
import json
import socket
import threading
from pathlib import Path

import httpx

from imagefarm import oci
from imagefarm.names.reference import Reference, parse
from imagefarm.registry import RegistryClient


def tiny_layers(tmp: Path, *names: str) -> list[oci.Layer]:
    return [oci.write_layer([oci.file_entry(f"testbed/{n}", f"{n}\n".encode())], tmp / "blobs") for n in names]


def push_image(client: RegistryClient, ref: str | Reference, layers: list[oci.Layer], *,
               env: list[str] | None = None, architecture: str = "amd64", docker: bool = False) -> str:
    """Push a synthetic image with the client under test; returns its manifest digest."""
    ref = parse(ref) if isinstance(ref, str) else ref
    for layer in layers:
        client.upload_blob(ref, layer.digest, layer.path)
    cfg = oci.canonical_json(oci.image_config(layers, env=env or ["PATH=/usr/bin:/bin"],
                                              working_dir="/testbed", architecture=architecture))
    client.upload_blob(ref, oci.sha256_digest(cfg), cfg)
    manifest = oci.image_manifest(cfg, layers)
    media = oci.OCI_MANIFEST
    if docker:
        media = oci.DOCKER_MANIFEST
        manifest["mediaType"] = media
        manifest["config"]["mediaType"] = oci.DOCKER_CONFIG
        for d in manifest["layers"]:
            d["mediaType"] = oci.DOCKER_LAYER_GZIP
    return client.put_manifest(ref, oci.canonical_json(manifest), media)


class FaultProxy:
    """HTTP proxy to ``upstream`` with scripted faults and optional bearer auth."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults: list[str] = []          # popped per request: "503", "429", "drop"
        self.bearer: dict[str, str] | None = None  # users -> password for /token
        self.tokens: dict[str, str] = {}     # token -> granted scope string
        self.token_requests: list[list[str]] = []
        self.seen: list[str] = []
        self.canned: dict[str, tuple[str, bytes]] = {}  # path -> (content type, body) served as is
        self.tag_page: int | None = None     # paginate tag lists (as distribution 3 / Hub do)
        self.tag_loop = False                # tag pages whose Link points back at themselves
        self.realm: str | None = None        # token realm announced (default: this proxy's /token)
        self.token_auth: list[str] = []      # Authorization header of each /token request
        self._http = httpx.Client(base_url=upstream, timeout=30)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _any(self):
                proxy.handle(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._http.close()

    # -- request handling ------------------------------------------------------
    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        self.seen.append(f"{h.command} {h.path}")
        length = int(h.headers.get("Content-Length") or 0)
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = _read_chunked(h.rfile)
        else:
            body = h.rfile.read(length) if length else b""
        if h.path.startswith("/token"):
            return self._token(h)
        fault = self.faults.pop(0) if self.faults else None
        if fault == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault in ("503", "429"):
            return _reply(h, int(fault), b'{"errors":[{"code":"UNAVAILABLE","message":"injected"}]}')
        if self.bearer is not None and not self._authorized(h):
            realm = self.realm or f"http://{self.host}/token"
            return _reply(h, 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}',
                          {"WWW-Authenticate": f'Bearer realm="{realm}",service="fault-proxy"'})
        if h.path in self.canned:
            ctype, canned = self.canned[h.path]
            return _reply(h, 200, canned, {"Content-Type": ctype}, head=h.command == "HEAD",
                          length=str(len(canned)))
        if self.tag_loop and "/tags/list" in h.path:
            path = h.path.split("?", 1)[0]
            return _reply(h, 200, b'{"name":"loop","tags":["t0"]}',
                          {"Content-Type": "application/json", "Link": f'<{path}?n=1&last=t0>; rel="next"'})
        if self.tag_page and "/tags/list" in h.path:
            return self._tags_page(h)
        headers = {k: v for k, v in h.headers.items()
                   if k.lower() not in ("host", "authorization", "connection", "transfer-encoding")}
        headers["Content-Length"] = str(len(body))
        resp = self._http.request(h.command, h.path, content=body, headers=headers)
        out = {k: v for k, v in resp.headers.items()
               if k.lower() not in ("connection", "transfer-encoding", "content-length", "content-encoding")}
        if "location" in {k.lower() for k in out}:
            key = next(k for k in out if k.lower() == "location")
            out[key] = out[key].replace(self.upstream, f"http://{self.host}")
        _reply(h, resp.status_code, resp.content, out, head=h.command == "HEAD",
               length=resp.headers.get("Content-Length"))

    def _tags_page(self, h) -> None:
        from urllib.parse import parse_qs, urlsplit
        parts = urlsplit(h.path)
        doc = self._http.get(parts.path).json()
        tags = sorted(doc["tags"])
        last = parse_qs(parts.query).get("last", [""])[0]
        rest = [t for t in tags if t > last]
        page, more = rest[:self.tag_page], rest[self.tag_page:]
        headers = {"Content-Type": "application/json"}
        if more:
            headers["Link"] = f'<{parts.path}?n={self.tag_page}&last={page[-1]}>; rel="next"'
        _reply(h, 200, json.dumps({"name": doc["name"], "tags": page}).encode(), headers)

    def _authorized(self, h) -> bool:
        auth = h.headers.get("Authorization", "")
        if h.path == "/v2/" and auth.startswith("Bearer ") and auth[7:] in self.tokens:
            return True
        if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
            return False
        granted = self.tokens[auth[7:]]
        parts = h.path.split("/")
        if len(parts) < 4:
            return True
        # /v2/<name...>/(manifests|blobs|tags)/...
        idx = next(i for i, p in enumerate(parts) if p in ("manifests", "blobs", "tags"))
        repo = "/".join(parts[2:idx])
        need = "push" if h.command in ("PUT", "POST", "PATCH", "DELETE") else "pull"
        return any(s.startswith(f"repository:{repo}:") and need in s.split(":")[2].split(",")
                   for s in granted.split(" "))

    def _token(self, h) -> None:
        from urllib.parse import parse_qs, urlsplit
        q = parse_qs(urlsplit(h.path).query)
        auth = h.headers.get("Authorization", "")
        self.token_auth.append(auth)
        user, _, password = base64.b64decode(auth[6:]).decode().partition(":") if auth.startswith("Basic ") else ("", "", "")
        if self.bearer and self.bearer.get(user) != password:
            return _reply(h, 401, b'{"details":"bad credentials"}')
        scopes = q.get("scope", [])
        self.token_requests.append(scopes)
        token = f"tok{len(self.tokens)}"
        self.tokens[token] = " ".join(scopes)
        _reply(h, 200, json.dumps({"token": token, "expires_in": 300}).encode())


def _read_chunked(rfile) -> bytes:
    out = bytearray()
    while True:
        size = int(rfile.readline().strip().split(b";")[0], 16)
        if size == 0:
            rfile.readline()
            return bytes(out)
        out += rfile.read(size)
        rfile.readline()


def _reply(h, code: int, body: bytes, headers: dict | None = None, head: bool = False,
           length: str | None = None) -> None:
    h.send_response(code)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", length if head and length else str(len(body)))
    h.end_headers()
    if not head:
        h.wfile.write(body)
