"""A node process of a fleet: runtimes under podman on this node, for a front.

``imagefarm runtime node --join FRONT_URL`` (one per SLURM node, started by ``srun``)
is a runtime server (``RuntimeManager``: ports, images, launch and readiness,
monitor and reaping, all node-local) whose API only its front calls, with the fleet
key. It joins by reporting: its id (the state directory's), the address its runtimes
are reached at (``--advertise``), its slots, the images it holds, and every runtime
with its state. It reports on every change (a runtime turning ready reaches the front
in one request) and at least every ``heartbeat`` seconds; the front answers which
runtimes to remove (stopped while the node was away) and which the trainer touched
(so the node's idle reaper sees the activity).

Before it takes sandboxes it pulls the payload image of each recipe it serves
(``--payload``; the manager does, see ``images.NodeImages.pull_payloads``) and any
``--prefetch`` images: it reports ``ready: false`` until then. ``/node/prefetch`` pulls
images and keeps warm sandboxes of them (``warm.py``), which the node reports per
image (never as runtimes: they are the node's until a start is handed one). It
starts clean (``clean_start``: what a killed node process left was reported failed
by the front) and removes its runtimes when it stops (the job ends), telling the
front it left.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field, ValidationError

from imagefarm.errors import InvalidReference
from imagefarm.host.statedir import state_subdir
from imagefarm.names.reference import parse
from imagefarm.serve.apikey import HEADER, key_matches, safe_errors

from .manager import RuntimeManager
from .models import RuntimeInfo, StartRequest
from .resolver import pinned_image
from .warm import Template

#: the header a node sends its own token in (the front gave it when the node joined)
NODE_TOKEN = "X-Node-Token"
log = logging.getLogger("imagefarm.runtime.node")


class NodeStart(BaseModel):
    """``POST /node/start`` from the front: the request, the pinned image, the runtime id."""

    request: StartRequest
    runtime_id: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    prebuilt: str = Field(min_length=1, max_length=1024, pattern=r"@sha256:[0-9a-f]{64}$")
    base: str | None = None
    size: int = Field(0, ge=0)


class PrefetchItem(BaseModel):
    image: str = Field(min_length=1, max_length=1024, pattern=r"@sha256:[0-9a-f]{64}$")
    size: int = Field(0, ge=0)
    base: str | None = None
    recipe: str | None = Field(None, max_length=128)
    warm: int = Field(0, ge=0, le=64)
    template: dict[str, Any] | None = None  #: the start shape the front saw for the recipe


class NodePrefetch(BaseModel):
    images: list[PrefetchItem] = Field(max_length=10000)


@dataclass(frozen=True)
class PinnedHit:
    """The front's resolution, as the manager reads a resolver's hit."""

    image: str
    base: str | None
    digest: str
    size: int | None = None
    verified: bool = False
    agent_server_version: str | None = None

    @classmethod
    def of(cls, pinned: str, base: str | None, size: int = 0) -> "PinnedHit":
        """From the front's ``repo@sha256:...``, parsed once here (the wire model checked its shape)."""
        ref = parse(pinned)
        if ref.digest is None:
            raise InvalidReference(f"{pinned!r} names no digest: the front sends pinned images only")
        return cls(image=pinned, base=base, digest=ref.digest, size=size or None)


@dataclass
class NodeConfig:
    join: str                       #: the front's URL
    fleet_key: str
    url: str = ""                   #: this node's API URL as the front reaches it (set once bound)
    address: str = "127.0.0.1"      #: where its runtimes are reached (URLs handed to the trainer)
    slots: int = 1
    heartbeat: float = 1.0
    prefetch: list[str] = field(default_factory=list)


async def read_body(request: Request, key: str, model: type[BaseModel]) -> Any:
    """The fleet key first, then the body: nothing is read for a caller without the key."""
    if not key_matches(request.headers.get(HEADER), key):
        raise HTTPException(401, f"missing or wrong fleet key: send it in the {HEADER} header")
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise HTTPException(422, safe_errors(exc.errors())) from None


class NodeAgent:
    def __init__(self, manager: RuntimeManager, config: NodeConfig) -> None:
        self.manager, self.config = manager, config
        self.boot = secrets.token_hex(6)
        self.ready = not config.prefetch
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._prefetches: set[asyncio.Task] = set()
        self._http: httpx.AsyncClient | None = None
        self._joined = False
        manager.records.on_change.append(lambda _rec: self._changed.set())

    # -- lifecycle (app hooks) ---------------------------------------------------------------
    async def start(self) -> None:
        # reports leave from this node's own address: the front only accepts a URL on the
        # address a node connects from
        source = _local_ip(self.config.address)
        transport = httpx.AsyncHTTPTransport(local_address=source) if source else None
        headers = {HEADER: self.config.fleet_key}
        if token := self._token_file().read_text().strip() if self._token_file().exists() else "":
            headers[NODE_TOKEN] = token
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0), trust_env=False,
                                       headers=headers, transport=transport)
        self._tasks = [asyncio.create_task(self._report_loop(), name="node-report")]
        if self.config.prefetch:
            self._tasks.append(asyncio.create_task(self._join_prefetch(), name="node-prefetch"))

    async def stop(self) -> None:
        for t in self._tasks + list(self._prefetches):
            t.cancel()
        await asyncio.gather(*self._tasks, *self._prefetches, return_exceptions=True)
        try:
            await self._http.post(f"{self.config.join}/fleet/leave", json={"node_id": self.manager.server_id})
            log.info("left the fleet at %s", self.config.join)
        except httpx.HTTPError as exc:
            log.warning("could not tell the front this node leaves: %s", exc)
        await self._http.aclose()

    # -- prefetch ----------------------------------------------------------------------------
    async def _join_prefetch(self) -> None:
        t0 = time.monotonic()
        for image in self.config.prefetch:
            try:
                hit = await self.manager.resolve(image)
                await self.manager.images.ensure(pinned_image(hit), size=await self.manager.image_size(hit))
            except Exception as exc:  # noqa: BLE001 - a failed prefetch must not keep the node out
                log.warning("prefetch of %s failed (the node takes sandboxes anyway): %s", image, exc)
        self.ready = True
        log.info("prefetched %d image(s) in %.1fs: taking sandboxes", len(self.config.prefetch),
                 time.monotonic() - t0)
        self._changed.set()

    def prefetch(self, items: list[PrefetchItem]) -> dict[str, int]:
        """Pull what the front sends and keep its warm sandboxes; {image: warm}."""
        warm = {}
        for item in items:
            hit = PinnedHit.of(item.image, item.base, item.size)
            template = Template.from_json(item.template) if item.template else None
            _pull, warm[item.image] = self.manager.prefetch_pinned(hit, item.image, item.size, item.recipe,
                                                                   item.warm, template)
        self._changed.set()
        return warm

    # -- reports -----------------------------------------------------------------------------
    def report_body(self) -> dict[str, Any]:
        m = self.manager
        return {
            "node_id": m.server_id, "boot": self.boot, "url": self.config.url, "address": self.config.address,
            "slots": self.config.slots, "ready": self.ready and m.ready,
            "images": sorted(m.images.present | m.images.pulling()),
            "runtimes": [m.info(r).model_dump(mode="json") for r in m.runtimes()],  # warm ones are the node's
            "warm": m.warm.by_image(), "payloads": [p.row() for p in m.images.payloads],
            "stats": m.stats(),
        }

    async def _report_loop(self) -> None:
        backoff = self.config.heartbeat
        while True:
            self._changed.clear()
            try:
                r = await self._http.post(f"{self.config.join}/fleet/report", json=self.report_body())
                if r.status_code != 200:
                    raise httpx.HTTPStatusError(f"{r.status_code}: {r.text[:300]}", request=r.request, response=r)
                if not self._joined:
                    log.info("joined the fleet at %s as node %s (%d slots, runtimes at %s)", self.config.join,
                             self.manager.server_id, self.config.slots, self.config.address)
                    self._joined = True
                await self._apply(r.json())
                backoff = self.config.heartbeat
            except httpx.HTTPError as exc:
                if self._joined or backoff == self.config.heartbeat:
                    log.warning("the front at %s did not take this node's report: %s (retrying)",
                                self.config.join, exc)
                self._joined = False
                backoff = min(backoff * 2, 2.0)  # a restarted front gives nodes its node timeout
            try:
                await asyncio.wait_for(self._changed.wait(), backoff)
                await asyncio.sleep(0.01)  # gather a burst of changes into one report
            except asyncio.TimeoutError:
                pass

    def _token_file(self) -> Path:
        """Where this node keeps the token the front gave it (0600, in its private state):
        a node process started again on the node speaks as the same node."""
        return state_subdir(self.manager.settings.state_dir, "fleet-node") / "token"

    def _keep_token(self, token: str) -> None:
        path = self._token_file()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        self._http.headers[NODE_TOKEN] = token

    async def _apply(self, answer: dict[str, Any]) -> None:
        if answer.get("node_token"):
            self._keep_token(answer["node_token"])
        m = self.manager
        for rid in answer.get("touched") or []:
            if rid in m.records:
                m.touch(m.records[rid])
        for rid in answer.get("remove") or []:
            if rid in m.records:
                log.info("runtime %s: the front no longer wants it; removing it", rid)
                await m.stop(rid, "removed (unknown to the front, or failed while this node was away)")


def _local_ip(address: str) -> str | None:
    """``address`` as an IP this machine can send from (None: let the kernel choose)."""
    import socket

    try:
        ip = socket.getaddrinfo(address, None, socket.AF_INET)[0][4][0]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
        return ip
    except OSError:
        return None


def add_node_routes(app: FastAPI, agent: NodeAgent) -> None:
    manager, key = agent.manager, agent.config.fleet_key
    app.state.after_startup.append(agent.start)
    app.state.before_shutdown.append(agent.stop)

    @app.post("/node/start", response_model=RuntimeInfo, tags=["node"])
    async def node_start(request: Request) -> RuntimeInfo:
        """A runtime the front placed here (image resolved and pinned by the front)."""
        body = await read_body(request, key, NodeStart)
        hit = PinnedHit.of(body.prebuilt, body.base, body.size)
        rec = await manager.start(body.request, hit=hit, runtime_id=body.runtime_id)
        return manager.info(rec)

    @app.post("/node/prefetch", tags=["node"])
    async def node_prefetch(request: Request) -> dict[str, Any]:
        body = await read_body(request, key, NodePrefetch)
        return {"queued": len(body.images), "warm": agent.prefetch(body.images)}
