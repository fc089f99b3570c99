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
or a key file), never the clients' key. Who joined and what each node last said is
``nodes.NodeBook``'s; the routes nodes call are ``frontapi``'s; this module keeps the
runtimes (records, placement, forwarding, prefetch).
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

from imagefarm.serve.apikey import HEADER
from imagefarm.settings import Settings

from .config import FrontOptions, ServeConfig
from .errors import CapacityFull, NodeError, RuntimeServerError
from .nodes import Node, NodeBook
from .models import PrefetchRequest, RuntimeInfo, StartRequest
from .placement import NodeView, place, prefetch_target, slots_needed
from .ports import parse_command
from .records import LIVE, Records
from .resolver import Resolver, Resolving, pinned_image, recipe_for_command
from .state import Store
from .warm import Template, Templates

log = logging.getLogger("imagefarm.runtime.fleet")


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


class Fleet:
    """The ``RuntimeService`` of a fleet's front: runtimes on the nodes that joined it."""

    def __init__(self, settings: Settings, resolver: Resolver, config: ServeConfig, options: FrontOptions) -> None:
        self.settings, self.config = settings, config
        self.resolving = Resolving(settings, resolver)
        self.fleet_key = options.fleet_key
        self.node_timeout = options.node_timeout
        self.placement = options.placement
        self.to = self.resolving.to
        self.store = Store(config.state_dir or settings.state_dir / "fleet", record=FrontRecord)
        self.server_id = ""
        self.records = Records(self.store)
        self.book = NodeBook(self.store)
        self._touched: dict[str, set[str]] = {}
        self.records.on_touch.append(lambda rec: self._touched.setdefault(rec.node_id, set()).add(rec.runtime_id))
        self.templates = Templates(self.store, settings.recipe)  #: start shapes, for the nodes' warm sandboxes
        self._http: httpx.AsyncClient | None = None
        self._bg: list[asyncio.Task] = []
        self._rng = random.Random(0)
        self._chores: set[asyncio.Task] = set()
        self.on_ready: list = []

    @property
    def nodes(self) -> dict[str, Node]:
        return self.book.nodes

    # -- lifecycle ------------------------------------------------------------------------
    async def startup(self) -> None:
        self.store.lock()
        self.server_id = self.store.server_id()
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=2.0), trust_env=False,
                                       headers={HEADER: self.fleet_key})
        self.book.load()
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
        self.book.save()
        self.store.close()

    def _chore(self, coro) -> None:
        """A background task kept referenced until done (a bare create_task may be collected)."""
        task = asyncio.create_task(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

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
        # warm sandboxes are not counted: they give their slots up to real starts (the node's admission)
        return [NodeView(n.node_id, n.slots, used.get(n.node_id, 0.0), frozenset(images.get(n.node_id, ())),
                         ready=n.ready and n.state == "up", warm=frozenset(i for i, k in n.warm.items() if k))
                for n in self.nodes.values()]

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
        argv = parse_command(req.command)
        recipe = recipe_for_command(self.settings, argv)
        hit = await self.resolving.resolve(req.image, recipe, version=req.agent_server_version)
        size = await self.resolving.image_size(hit)
        prebuilt = pinned_image(hit)
        self.templates.learn(recipe, Template.of(req, argv, "image"))
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
        """Pull images onto nodes ahead of the trainer and keep ``req.warm`` sandboxes of
        each there: each image to ``placement.prefetch_target`` (a node holding it, else
        the one with the most room for warm sandboxes, else the fewest images), where the
        trainer's starts are then placed (``place`` prefers a node with a warm sandbox)."""
        planned: dict[str, set[str]] = {}
        promised: dict[str, int] = {}  #: warm sandboxes this prefetch asked of each node
        out = []
        for image in req.images:
            hit = await self.resolving.resolve(image, req.recipe, version=req.agent_server_version)
            pinned, size = pinned_image(hit), await self.resolving.image_size(hit)
            views = [NodeView(v.node_id, v.slots, v.used, v.images | planned.get(v.node_id, set()), v.ready)
                     for v in self.views()]
            chosen = prefetch_target(views, pinned, req.warm, promised)
            if chosen is None:
                raise CapacityFull("no node has joined the fleet yet: nothing to prefetch onto")
            pull = pinned not in chosen.images
            planned.setdefault(chosen.node_id, set()).add(pinned)
            promised[chosen.node_id] = promised.get(chosen.node_id, 0) + req.warm
            out.append({"image": image, "prebuilt_image": pinned, "node": chosen.node_id, "pull": pull,
                        "warm": 0, "_item": {"image": pinned, "size": size, "base": getattr(hit, "base", None),
                                             "recipe": req.recipe, "warm": req.warm}})
        template = self.templates.get(req.recipe)
        by_node: dict[str, list[dict[str, Any]]] = {}
        for row in out:
            item = row.pop("_item")
            if row["pull"] or req.warm or self.nodes[row["node"]].warm.get(item["image"]):  # warm 0: none kept
                if template is not None:
                    item["template"] = template.to_json()
                by_node.setdefault(row["node"], []).append(item)
        for node_id, items in by_node.items():
            node = self.nodes[node_id]
            try:
                r = await self._http.post(f"{node.url}/node/prefetch", json={"images": items})
                r.raise_for_status()
            except httpx.HTTPError as exc:
                raise NodeError(f"node {node_id} ({node.url}) did not take the prefetch: {exc}") from None
            warm = r.json().get("warm") or {}
            for row in out:
                if row["node"] == node_id:
                    row["warm"] = int(warm.get(row["prebuilt_image"], 0))
        return out

    # -- reports from nodes ------------------------------------------------------------------
    def report(self, data: dict[str, Any]) -> dict[str, Any]:
        """A node's report (join, heartbeat or change): merge, answer what it should do."""
        nid = data["node_id"]
        noted = self.book.note(data)
        node, restarted = noted.node, noted.restarted
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

    def leave(self, node_id: str) -> None:
        node = self.book.leave(node_id)
        if node is None:
            return
        for rec in [r for r in self.records.values() if r.node_id == node_id and r.status in LIVE]:
            self._fail(rec, f"node {node_id} ({node.address}) left the fleet (its job ended)")

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
            for node, why in self.book.expire(self.node_timeout):
                for rec in [r for r in self.records.values() if r.node_id == node.node_id and r.status in LIVE]:
                    self._fail(rec, why)
            # failed runtimes nobody polls are forgotten after failed_ttl, as on one node
            ttl = self.config.failed_ttl
            for rec in [r for r in self.records.values() if r.status == "error" and time.time() - r.last_activity > ttl]:
                self.records.forget(rec.runtime_id)
                self._chore(self._forward_stop(rec))

    # -- what GET /nodes and the metrics show ----------------------------------------------------
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
                         "runtimes": states, "images": len(n.images), "warm": n.warm, "payloads": n.payloads,
                         "last_report_s": round(now - n.last_seen, 2), "stats": n.stats})
        return rows


def _detail(r: httpx.Response) -> str:
    try:
        return str(r.json().get("detail"))
    except ValueError:
        return r.text[:500]
