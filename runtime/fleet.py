"""The front of a fleet: one runtime API, runtimes placed on node processes that joined it.

The trainer talks to the front only (``imagefarm runtime serve --fleet``); node
processes (``imagefarm runtime node --join URL``, one per SLURM node) run podman and
join with their capacity. The front

* places each ``/start`` (``placement.place``: a node holding the image, else the
  least loaded) and forwards it to the node (``POST /node/start``; ``/stop``,
  ``/pause``, ``/resume`` likewise), with the image already resolved and pinned;
* answers status polls from its own state, which nodes keep fresh: a node pushes a
  report of all its runtimes on every change (a runtime turning ready reaches the
  front in one request) and at least every ``heartbeat`` seconds;
* declares a node lost after ``node_timeout`` seconds without a report: its runtimes
  turn ``failed`` with the reason at once, a client never waits for its own timeout;
* keeps records and nodes in sqlite (``state_dir/fleet``): a restarted front finds
  its runtimes, and its nodes find it (they keep reporting; a node is given
  ``node_timeout`` from the front's start to do so).

Front and nodes authenticate each other with the fleet key (``IMAGEFARM_FLEET_KEY``
or a key file), never the clients' key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import httpx
from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

from imagefarm.serve.apikey import HEADER
from imagefarm.settings import Settings

from .config import ServeConfig
from .errors import NodeForbidden, CapacityFull, NodeError, RuntimeServerError
from .models import PrefetchRequest, RuntimeInfo, StartRequest
from .placement import NodeView, place, slots_needed
from .ports import parse_command
from .records import LIVE, Records
from .resolver import Resolver, Resolving, pinned_image, recipe_for_command
from .state import Store

log = logging.getLogger("imagefarm.runtime.fleet")


@dataclass(frozen=True)
class FrontOptions:
    fleet_key: str
    node_timeout: float = 5.0     #: seconds without a node report before its runtimes are failed
    placement: str = "image"      #: image | random (random: for comparison only)


@dataclass
class FrontRecord:
    """A runtime as the front knows it: where it runs and what its node last said."""

    runtime_id: str
    session_id: str
    node_id: str
    image: str
    prebuilt: str
    base: str | None
    resource_factor: float
    created_at: float
    last_activity: float
    info: dict[str, Any] = field(default_factory=dict)  #: the node's RuntimeInfo
    status: str = "running"
    pod_status: str = "pending"
    reason: str = ""
    seen: bool = False            #: a node report has named it
    ready_at: float | None = None

    @property
    def url(self) -> str:
        return self.info.get("url", "")

    @property
    def session_api_key(self) -> str:
        return self.info.get("session_api_key", "")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FrontRecord":
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Node:
    node_id: str
    url: str
    address: str
    slots: int
    boot: str = ""
    ready: bool = False
    state: str = "up"              #: up | lost | left
    last_seen: float = 0.0         #: monotonic
    images: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    token_hash: str = ""           #: sha256 of the token the node got when it joined

    def persist(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("last_seen")
        return d


class Fleet:
    """The ``RuntimeService`` of a fleet's front: runtimes on the nodes that joined it."""

    def __init__(self, settings: Settings, resolver: Resolver, config: ServeConfig, *, fleet_key: str,
                 node_timeout: float = 5.0, placement: str = "image") -> None:
        self.settings, self.config = settings, config
        self.resolving = Resolving(settings, resolver)
        self.fleet_key = fleet_key
        self.node_timeout = node_timeout
        self.placement = placement
        self.to = self.resolving.to
        self.store = Store(config.state_dir or settings.state_dir / "fleet", record=FrontRecord)
        self.server_id = ""
        self.records = Records(self.store)
        self.nodes: dict[str, Node] = {}
        self._tokens: dict[str, str] = {}  # tokens handed out by admit() before the node's first report
        self._touched: dict[str, set[str]] = {}
        self.records.on_touch.append(lambda rec: self._touched.setdefault(rec.node_id, set()).add(rec.runtime_id))
        self._http: httpx.AsyncClient | None = None
        self._bg: list[asyncio.Task] = []
        self._rng = random.Random(0)
        self._chores: set[asyncio.Task] = set()
        self.on_ready: list = []

    # -- lifecycle ------------------------------------------------------------------------
    async def startup(self) -> None:
        self.store.lock()
        self.server_id = self.store.server_id()
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=2.0), trust_env=False,
                                       headers={HEADER: self.fleet_key})
        now = time.monotonic()
        for d in json.loads(self.store.meta("nodes") or "{}").values():
            node = Node(**d, last_seen=now)  # a grace of node_timeout to report again
            self.nodes[node.node_id] = node
        self.records.load()
        self._bg = [asyncio.create_task(self._watch_nodes(), name="fleet-watch")]
        log.info("fleet front %s: %d node(s) and %d runtime(s) found again; node timeout %gs, placement %s",
                 self.server_id, len(self.nodes), len(self.records), self.node_timeout, self.placement)

    async def shutdown(self) -> None:
        for t in self._bg:
            t.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)
        if self.config.stop_on_exit and self.records:
            log.info("stopping %d runtime(s) on exit (--stop-on-exit)", len(self.records))
            await asyncio.gather(*[self._forward_stop(r) for r in list(self.records.values())],
                                 return_exceptions=True)
        if self._http:
            await self._http.aclose()
        self.resolving.close()
        self._save_nodes()
        self.store.close()

    def _chore(self, coro) -> None:
        """A background task kept referenced until done (a bare create_task may be collected)."""
        task = asyncio.create_task(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    def _save_nodes(self) -> None:
        self.store.set_meta("nodes", json.dumps({n.node_id: n.persist() for n in self.nodes.values()}))

    # -- the manager surface the app uses --------------------------------------------------
    def live_count(self) -> int:
        return sum(1 for r in self.records.values() if r.status in LIVE)

    def get(self, runtime_id: str) -> FrontRecord:
        return self.records.get_or_raise(runtime_id)

    def by_session_id(self, session_id: str) -> FrontRecord:
        return self.records.by_session_id(session_id)

    def runtimes(self) -> list[FrontRecord]:
        return list(self.records.values())

    def touch(self, rec: FrontRecord) -> None:
        self.records.touch(rec, time.time())  # the node hears of it in its next report's answer

    async def resolve(self, image: str, recipe: str | None = None, *, version: str | None = None) -> Any:
        return await self.resolving.resolve(image, recipe, version=version)

    async def image_size(self, hit: Any) -> int:
        return await self.resolving.image_size(hit)

    async def refresh(self, rec: FrontRecord) -> None:
        """Polls are answered from the nodes' reports: nothing to ask here."""

    def info(self, rec: FrontRecord) -> RuntimeInfo:
        data = dict(rec.info) or {
            "runtime_id": rec.runtime_id, "session_id": rec.session_id, "url": "", "session_api_key": "",
            "run_as_user": "image", "created_at": rec.created_at, "last_activity": rec.last_activity}
        data.update(image=rec.image, prebuilt_image=rec.prebuilt, base_image=rec.base,
                    status=rec.status, pod_status=rec.pod_status, last_activity=rec.last_activity,
                    resource_factor=rec.resource_factor)
        if rec.status == "error" and rec.reason:
            data["restart_reasons"] = [rec.reason]
            data["pod_logs"] = data.get("pod_logs") or rec.reason
            for cs in data.get("container_statuses") or []:
                cs.update(state="terminated", ready=False, reason=rec.reason)
        return RuntimeInfo(**data)

    # -- placement ---------------------------------------------------------------------------
    def views(self) -> list[NodeView]:
        used: dict[str, float] = {}
        images: dict[str, set[str]] = {n: set(node.images) for n, node in self.nodes.items()}
        for r in self.records.values():
            if r.status in LIVE:
                used[r.node_id] = used.get(r.node_id, 0.0) + slots_needed(r.resource_factor)
                images.setdefault(r.node_id, set()).add(r.prebuilt)
        return [NodeView(n.node_id, n.slots, used.get(n.node_id, 0.0), frozenset(images.get(n.node_id, ())),
                         ready=n.ready and n.state == "up") for n in self.nodes.values()]

    def _place(self, image: str, resource_factor: float, exclude: set[str]) -> Node | None:
        views = [v for v in self.views() if v.node_id not in exclude]
        chosen = place(views, image, resource_factor, policy=self.placement, rng=self._rng)  # type: ignore[arg-type]
        return self.nodes[chosen.node_id] if chosen else None

    # -- start / stop / pause / resume ---------------------------------------------------------
    async def start(self, req: StartRequest) -> FrontRecord:
        rec = self.records.live_session(req.session_id)
        if rec is not None:
            self.touch(rec)
            return rec
        hit = await self.resolving.resolve(req.image, recipe_for_command(self.settings, parse_command(req.command)),
                                           version=req.agent_server_version)
        size = await self.resolving.image_size(hit)
        prebuilt = pinned_image(hit)
        tried: set[str] = set()
        while True:
            rec = self.records.live_session(req.session_id)
            if rec is not None:
                return rec
            old = self.records.replace_session(req.session_id)
            if old is not None:
                self._chore(self._forward_stop(old))
            node = self._place(prebuilt, req.resource_factor, tried)
            if node is None:
                free = {v.node_id: v.free for v in self.views()}
                raise CapacityFull(
                    f"every node of the fleet is full ({len(self.nodes)} node(s), free slots {free}; this start "
                    f"needs {slots_needed(req.resource_factor):g}): retry later, or add nodes "
                    "(`imagefarm runtime node --join ...`)")
            now = time.time()
            rec = FrontRecord(runtime_id=secrets.token_hex(8), session_id=req.session_id, node_id=node.node_id,
                              image=req.image, prebuilt=prebuilt, base=getattr(hit, "base", None) or None,
                              resource_factor=float(req.resource_factor), created_at=now, last_activity=now)
            # the slot is held from here (no await before this line), so concurrent starts see it taken
            self.records.add(rec)
            body = {"request": req.model_dump(mode="json"), "runtime_id": rec.runtime_id, "prebuilt": prebuilt,
                    "base": rec.base, "size": size}
            try:
                r = await self._http.post(f"{node.url}/node/start", json=body)
            except httpx.HTTPError as exc:
                self.records.forget(rec.runtime_id)
                log.warning("node %s (%s) did not take runtime %s: %s; placing it elsewhere",
                            node.node_id, node.url, rec.runtime_id, exc)
                tried.add(node.node_id)
                continue
            if r.status_code == 429:
                self.records.forget(rec.runtime_id)
                tried.add(node.node_id)
                continue
            if r.status_code != 200:
                self.records.forget(rec.runtime_id)
                raise NodeError(f"node {node.node_id} refused the start ({r.status_code}): {_detail(r)}",
                                r.status_code)
            if rec.runtime_id in self.records:
                self._merge(rec, r.json(), reported=False)
                self.records.save(rec)
            log.info("runtime %s: session %s, image %s -> node %s (%s)", rec.runtime_id, rec.session_id,
                     prebuilt, node.node_id, node.address)
            return rec

    async def _forward(self, rec: FrontRecord, verb: str) -> dict[str, Any]:
        node = self.nodes.get(rec.node_id)
        if node is None or node.state != "up":
            raise RuntimeServerError(f"runtime {rec.runtime_id} cannot be {verb}d: its node {rec.node_id} "
                                     f"is {node.state if node else 'gone'} ({rec.reason})")
        try:
            r = await self._http.post(f"{node.url}/{verb}", json={"runtime_id": rec.runtime_id})
        except httpx.HTTPError as exc:
            raise NodeError(f"node {node.node_id} ({node.url}) did not answer /{verb}: {exc}") from None
        if r.status_code != 200:
            log.warning("node %s answered /%s of %s with %d: %s", node.node_id, verb, rec.runtime_id,
                        r.status_code, _detail(r))
            raise NodeError(f"node {node.node_id}: {_detail(r)}", r.status_code)
        return r.json()

    async def _forward_stop(self, rec: FrontRecord) -> None:
        node = self.nodes.get(rec.node_id)
        if node is None or node.state != "up":
            return  # the node removes it when it reports again (answered with `remove`)
        try:
            await self._http.post(f"{node.url}/stop", json={"runtime_id": rec.runtime_id})
        except httpx.HTTPError as exc:
            log.warning("node %s did not answer /stop of %s: %s (removed when it reports again)",
                        node.node_id, rec.runtime_id, exc)

    async def stop(self, rid: str, why: str = "stopped") -> None:
        rec = self.get(rid)
        self.records.forget(rid)
        await self._forward_stop(rec)
        log.info("runtime %s (session %s) %s", rid, rec.session_id, why)

    async def pause(self, rid: str) -> FrontRecord:
        rec = self.get(rid)
        await self._forward(rec, "pause")
        rec.status = "paused"
        self.touch(rec)
        return rec

    async def resume(self, rid: str) -> FrontRecord:
        rec = self.get(rid)
        await self._forward(rec, "resume")
        rec.status, rec.pod_status = "running", "running"
        self.touch(rec)
        return rec

    # -- prefetch ----------------------------------------------------------------------------
    async def prefetch(self, req: PrefetchRequest) -> list[dict[str, Any]]:
        """Pull images onto nodes ahead of the trainer: each to the node placement would
        choose for its first sample (a node holding it already: nothing to do)."""
        planned: dict[str, set[str]] = {}
        out = []
        for image in req.images:
            hit = await self.resolving.resolve(image, req.recipe, version=req.agent_server_version)
            pinned, size = pinned_image(hit), await self.resolving.image_size(hit)
            views = [NodeView(v.node_id, v.slots, v.used, v.images | planned.get(v.node_id, set()), v.ready)
                     for v in self.views()]
            holder = next((v for v in views if pinned in v.images), None)
            if holder is not None:
                out.append({"image": image, "prebuilt_image": pinned, "node": holder.node_id, "pull": False})
                continue
            ready = [v for v in views if v.ready]
            if not ready:
                raise CapacityFull("no node has joined the fleet yet: nothing to prefetch onto")
            # spread: the node with the fewest images (planned included), then the most free slots
            chosen = min(ready, key=lambda v: (len(v.images), -v.free, v.node_id))
            planned.setdefault(chosen.node_id, set()).add(pinned)
            out.append({"image": image, "prebuilt_image": pinned, "node": chosen.node_id, "pull": True,
                        "size": size})
        by_node: dict[str, list[dict[str, Any]]] = {}
        for item in out:
            if item["pull"]:
                by_node.setdefault(item["node"], []).append({"image": item["prebuilt_image"], "size": item["size"]})
        for node_id, items in by_node.items():
            node = self.nodes[node_id]
            try:
                r = await self._http.post(f"{node.url}/node/prefetch", json={"images": items})
                r.raise_for_status()
            except httpx.HTTPError as exc:
                raise NodeError(f"node {node_id} ({node.url}) did not take the prefetch: {exc}") from None
        return out

    # -- reports from nodes ------------------------------------------------------------------
    def report(self, data: dict[str, Any]) -> dict[str, Any]:
        """A node's report (join, heartbeat or change): merge, answer what it should do."""
        nid = data["node_id"]
        node = self.nodes.get(nid)
        restarted = node is not None and node.boot and node.boot != data["boot"]
        if node is None or restarted or node.state != "up":
            log.info("node %s %s at %s (API %s): %d slot(s)%s", nid,
                     "joined" if node is None else ("restarted" if restarted else "is back"),
                     data["address"], data["url"], data["slots"], "" if data.get("ready") else ", prefetching")
        if node is None:
            node = self.nodes[nid] = Node(node_id=nid, url=data["url"], address=data["address"], slots=data["slots"],
                                          token_hash=self._tokens.pop(nid, ""))
        node.url, node.address, node.slots = data["url"], data["address"], int(data["slots"])
        node.boot, node.ready, node.state = data["boot"], bool(data.get("ready")), "up"
        node.last_seen = time.monotonic()
        node.images = list(data.get("images") or [])
        node.stats = dict(data.get("stats") or {})
        self._save_nodes()
        reported = {r["runtime_id"]: r for r in data.get("runtimes") or []}
        remove = []
        for rid, info in reported.items():
            rec = self.records.get(rid)
            if rec is None or rec.node_id != nid or (rec.status == "error" and rec.reason.startswith("node ")):
                remove.append(rid)  # stopped while the node was away, or failed with its node: not wanted
                continue
            self._merge(rec, info, reported=True)
        stale = time.time() - 10
        for rec in [r for r in self.records.values() if r.node_id == nid and r.runtime_id not in reported]:
            if rec.status in LIVE and (rec.seen or restarted or rec.created_at < stale):
                self._fail(rec, f"node {nid} ({node.address}) no longer has this runtime"
                                + (" (the node process restarted)" if restarted else ""))
        touched = sorted(self._touched.pop(nid, set()))
        return {"remove": remove, "touched": touched, "front_id": self.server_id}

    def admit(self, node_id: str, token: str | None, peer: str | None, url: str | None = None) -> str | None:
        """Who may speak for ``node_id``: the node that joined as it, holding the token it
        got then (``NodeForbidden``, 403, otherwise); the URL it reports must be on the
        address it connects from, so the front only ever calls the node itself. A first
        report (join) returns the node's new token."""
        if url is not None:
            host = httpx.URL(url).host
            if peer not in _addresses(host):
                raise NodeForbidden(f"node {node_id}: its URL's host {host} is not the address it reports from "
                                    f"({peer}): refused (set --advertise to an address of that node)")
        node = self.nodes.get(node_id)
        if node is not None and node.token_hash:
            if not token or not secrets.compare_digest(_hash(token), node.token_hash):
                raise NodeForbidden(f"node {node_id} joined with its own token; this report does not carry it: "
                                    "refused (a node reports only for its own id)")
            return None
        if url is None:  # a leave for a node that never joined: nothing to do, nothing to give
            return None
        new = secrets.token_urlsafe(32)
        if node is not None:
            node.token_hash = _hash(new)
        else:
            self._tokens[node_id] = _hash(new)
        return new

    def leave(self, node_id: str) -> None:
        node = self.nodes.get(node_id)
        if node is None:
            return
        node.state = "left"
        for rec in [r for r in self.records.values() if r.node_id == node_id and r.status in LIVE]:
            self._fail(rec, f"node {node_id} ({node.address}) left the fleet (its job ended)")
        log.info("node %s left the fleet", node_id)
        self._save_nodes()

    def _merge(self, rec: FrontRecord, info: dict[str, Any], *, reported: bool) -> None:
        was = rec.pod_status
        rec.info = {k: v for k, v in info.items() if k in RuntimeInfo.model_fields}
        rec.seen = rec.seen or reported
        rec.status, rec.pod_status = info["status"], info["pod_status"]
        rec.reason = "; ".join(info.get("restart_reasons") or [])
        if rec.pod_status == "ready" and was != "ready" and rec.ready_at is None:
            rec.ready_at = time.time()
            for fn in self.on_ready:
                fn(rec, rec.ready_at - rec.created_at)
        if was != rec.pod_status:
            self.records.save(rec)

    def _fail(self, rec: FrontRecord, reason: str) -> None:
        rec.status, rec.pod_status, rec.reason = "error", "failed", reason
        self.records.save(rec)
        log.warning("runtime %s (session %s) failed: %s", rec.runtime_id, rec.session_id, reason)

    async def _watch_nodes(self) -> None:
        while True:
            await asyncio.sleep(min(0.5, self.node_timeout / 4))
            now = time.monotonic()
            for node in list(self.nodes.values()):
                if node.state == "up" and now - node.last_seen > self.node_timeout:
                    node.state = "lost"
                    why = (f"node {node.node_id} ({node.address}) stopped answering: no report for "
                           f"{now - node.last_seen:.1f}s (node timeout {self.node_timeout:g}s)")
                    log.warning("%s", why)
                    for rec in [r for r in self.records.values() if r.node_id == node.node_id and r.status in LIVE]:
                        self._fail(rec, why)
                    self._save_nodes()
            # failed runtimes nobody polls are forgotten after failed_ttl, as on one node
            ttl = self.config.failed_ttl
            for rec in [r for r in self.records.values() if r.status == "error" and time.time() - r.last_activity > ttl]:
                self.records.forget(rec.runtime_id)
                self._chore(self._forward_stop(rec))

    # -- what GET /nodes and the metrics show ----------------------------------------------------
    def counters(self) -> dict[str, int]:
        return {}

    def node_rows(self) -> list[dict[str, Any]]:
        views = {v.node_id: v for v in self.views()}
        now = time.monotonic()
        rows = []
        for n in self.nodes.values():
            v = views[n.node_id]
            states: dict[str, int] = {}
            for r in self.records.values():
                if r.node_id == n.node_id:
                    k = "paused" if r.status == "paused" else r.pod_status
                    states[k] = states.get(k, 0) + 1
            rows.append({"node_id": n.node_id, "url": n.url, "address": n.address, "state": n.state,
                         "ready": n.ready, "slots": n.slots, "free_slots": v.free if n.state == "up" else 0,
                         "runtimes": states, "images": len(n.images),
                         "last_report_s": round(now - n.last_seen, 2), **{"stats": n.stats}})
        return rows


def _hash(token: str) -> str:
    import hashlib

    return hashlib.sha256(token.encode()).hexdigest()


def _peer(request: Request) -> str | None:
    return request.client.host if request.client else None


def _addresses(host: str) -> set[str]:
    """The IP addresses ``host`` names (itself, for an IP)."""
    import ipaddress
    import socket

    try:
        return {str(ipaddress.ip_address(host.strip("[]")))}
    except ValueError:
        pass
    try:
        return {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    except OSError:
        return set()


def _detail(r: httpx.Response) -> str:
    try:
        return str(r.json().get("detail"))
    except ValueError:
        return r.text[:500]


class NodeReport(BaseModel):
    node_id: str = Field(min_length=1, max_length=64, pattern=r"^[0-9A-Za-z_.-]+$")
    boot: str = Field(min_length=1, max_length=64)
    url: str = Field(min_length=1, max_length=1024, pattern=r"^https?://")
    address: str = Field(min_length=1, max_length=255)
    slots: int = Field(ge=0, le=100000)
    ready: bool = True
    images: list[str] = Field(default_factory=list, max_length=100000)
    runtimes: list[dict[str, Any]] = Field(default_factory=list, max_length=100000)
    stats: dict[str, Any] = Field(default_factory=dict)


class NodeLeave(BaseModel):
    node_id: str = Field(min_length=1, max_length=64)


#: what nodes call on the front: open to the app's guard, checked against the fleet key instead
FRONT_PATHS = ("/fleet/report", "/fleet/leave")


def add_front_routes(app: FastAPI, fleet: Fleet) -> None:
    """``/fleet/report`` and ``/fleet/leave``: what nodes call, with the fleet key."""
    from .node import NODE_TOKEN, read_body

    @app.post("/fleet/report", tags=["fleet"])
    async def fleet_report(request: Request) -> dict[str, Any]:
        body = await read_body(request, fleet.fleet_key, NodeReport)
        token = fleet.admit(body.node_id, request.headers.get(NODE_TOKEN), _peer(request), body.url)
        answer = fleet.report(body.model_dump())
        return {**answer, "node_token": token} if token else answer

    @app.post("/fleet/leave", tags=["fleet"])
    async def fleet_leave(request: Request) -> dict[str, str]:
        body = await read_body(request, fleet.fleet_key, NodeLeave)
        fleet.admit(body.node_id, request.headers.get(NODE_TOKEN), _peer(request))
        fleet.leave(body.node_id)
        return {"node_id": body.node_id, "state": "left"}
