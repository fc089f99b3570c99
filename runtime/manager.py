"""Runtimes on this node: resolve, start, pause, stop; persisted and reconciled.

One runtime is one podman container running a prebuilt agent-server image, labelled
``imagefarm.runtime=1``, ``imagefarm.runtime.server=<server id>`` (a node process's
node id), ``imagefarm.runtime.id=<runtime id>`` and ``imagefarm.runtime.session=<session
id>``, published on ``<publish address>:<host port from the range>`` to the agent
server's port (``--port N`` in the command, else 60000).

``RuntimeManager`` (a ``service.RuntimeService``) is composed of parts, each given
what it uses: ``records.Records`` (the index), ``ports.py`` (host ports), ``images.py``
(pull once, cache budget, LRU eviction), ``launcher.Launcher`` (launch and readiness),
``upkeep.Upkeep`` (monitor and reaping); this module keeps the reconciliation after a
restart, admission (``placement.admits``, the front's rule too) and the verbs. ``/start`` answers at once (record
written, port reserved) and launches in a background task. A fleet's front
(``fleet.py``) places runtimes on node processes (``node.py``), each running one of
these managers.
A failed runtime's container is removed at once (it holds its slot until podman
confirms); its record, with the last log lines, stays for polls until ``failed_ttl``;
status polls never reset the idle clock.

User policy (``user_policy="image"``, the default): APIRemoteWorkspace always asks for
``run_as_user`` 10001 (and ``runtime_class`` sysbox-runc), but r2e images are
root-owned and have no user 10001, and the agent server run as 10001 there cannot
write its state (HOME) nor ``/testbed``. So the container runs as the image's own
user (``USER`` of the image config; root for r2e images) and the decision is logged
per runtime. ``user_policy="requested"`` honours ``run_as_user``/``fs_group`` with
``HOME=/tmp``, for images prepared for that user. Unknown runtime classes are
ignored with a log line: everything runs under podman with runc.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import httpx

from imagefarm.settings import Settings

from .backend import LABEL, LABEL_ID, LABEL_SERVER, PodmanBackend
from .config import ServeConfig
from .errors import BackendError, CapacityFull, RuntimeServerError
from .images import NodeImages
from .launcher import Launcher
from .models import ContainerStatus, PrefetchRequest, RuntimeInfo, StartRequest
from .placement import admits, slots_needed
from .ports import PortPool, agent_port, parse_command
from .records import LIVE, Records
from .resolver import Resolver, Resolving, pinned_image, ready_paths, recipe_for_command
from .state import Record, Store
from .upkeep import Upkeep

log = logging.getLogger("imagefarm.runtime")


def holds_slot(rec: Record) -> bool:
    """A live runtime, or a failed one whose container is not removed yet (it may still
    run and use the node)."""
    return rec.status in LIVE or not rec.extra.get("removed")


class RuntimeManager:
    """The ``RuntimeService`` of one node: its runtimes under podman."""

    def __init__(self, settings: Settings, backend: PodmanBackend, resolver: Resolver,
                 config: ServeConfig) -> None:
        self.settings, self.backend, self.config = settings, backend, config
        self.resolving = Resolving(settings, resolver)
        self.to = self.resolving.to
        self.store = Store(config.state_dir or settings.state_dir / "runtime")
        self.server_id = self.store.server_id()
        self.records = Records(self.store)
        #: called with (record, seconds from /start to ready)
        self.on_ready: list = []
        budget = int(config.image_cache_gib * 2**30) if config.image_cache_gib else None
        self.images = NodeImages(settings, backend, self.store, budget_bytes=budget,
                                 in_use=lambda: {r.prebuilt for r in self.records.values()})
        self.ports = PortPool(config.port_range, config.publish_address)
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(2.0, connect=1.0), trust_env=False)
        self.launcher = Launcher(server_id=self.server_id, backend=backend, config=config, images=self.images,
                                 ports=self.ports, records=self.records, http=self._http, on_ready=self.on_ready)
        self.upkeep = Upkeep(server_id=self.server_id, backend=backend, config=config, records=self.records,
                             launcher=self.launcher, http=self._http, stop=self.stop)
        self._chores: set[asyncio.Task] = set()

    # -- lifecycle ------------------------------------------------------------------
    async def startup(self) -> None:
        self.store.lock()
        self.records.load()
        if self.config.clean_start:
            await self._clean_start()
        await self.reconcile()
        await self.images.scan()
        self.upkeep.start()
        log.info("runtime server %s: %d runtime(s) found again, %d slot(s), ports %d-%d, idle timeout %s",
                 self.server_id, len(self.records), self.config.max_runtimes, *self.config.port_range,
                 f"{self.config.idle_timeout:g}s" if self.config.idle_timeout else "off")

    async def shutdown(self) -> None:
        await self.upkeep.close()
        await self.launcher.cancel_all()
        for t in list(self._chores):
            t.cancel()
        await asyncio.gather(*self._chores, return_exceptions=True)
        if self.config.stop_on_exit and self.records:
            log.info("stopping %d runtime(s) on exit (--stop-on-exit)", len(self.records))
            await self.backend.remove(*[r.container for r in self.records.values()])
            for rid in list(self.records):
                self.records.forget(rid)
        elif self.records:
            log.info("leaving %d runtime(s) running; a restarted server finds them again", len(self.records))
        release = getattr(self.backend, "release", None)
        if release is not None:  # no mount left behind under the state directory
            with contextlib.suppress(Exception):
                if gone := await release():
                    log.info("released %d mount(s) podman left under the state directory", len(gone))
        await self._http.aclose()
        self.resolving.close()
        self.store.close()

    def _chore(self, coro) -> None:
        """A background task kept referenced until done (a bare create_task may be collected)."""
        task = asyncio.create_task(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _clean_start(self) -> None:
        """A node process starting again: what it left is no one's any more (its front
        reported those runtimes failed when it stopped answering). Remove it all."""
        mine = await self.backend.list({LABEL_SERVER: self.server_id})
        if mine or self.records:
            log.warning("node %s starting again: removing the %d container(s) and %d record(s) it left",
                        self.server_id, len(mine), len(self.records))
            await self.backend.remove(*[c.name for c in mine])
        for rid in list(self.records):
            self.records.forget(rid)

    async def reconcile(self) -> None:
        """Match records with containers: leftovers removed, lost records dropped."""
        containers = await self.backend.list({LABEL_SERVER: self.server_id})
        by_rid = {c.labels.get(LABEL_ID, ""): c for c in containers}
        leftovers = [c for c in containers if c.labels.get(LABEL_ID, "") not in self.records]
        if leftovers:
            log.warning("removing %d container(s) left by a crash (labels of server %s, no state record): %s",
                        len(leftovers), self.server_id, ", ".join(c.name for c in leftovers))
            await self.backend.remove(*[c.name for c in leftovers])
        others = [c for c in await self.backend.list({LABEL: "1"})
                  if c.labels.get(LABEL_SERVER) != self.server_id]
        if others:
            log.info("%d runtime container(s) of other servers left alone", len(others))
        for rid, rec in list(self.records.items()):
            c = by_rid.get(rid)
            if c is None:
                log.warning("runtime %s (session %s): its container is gone; forgetting it", rid, rec.session_id)
                self.records.forget(rid)
            elif c.state == "running":
                rec.status, rec.pod_status = "running", "running"
                self.launcher.watch(rec)
            elif c.state == "paused":
                rec.status = "paused"
                self.records.save(rec)
            elif c.state in ("created", "configured", "initialized"):
                log.warning("runtime %s was never started (server crashed while creating it); removing it", rid)
                await self.backend.remove(rec.container)
                self.records.forget(rid)
            elif rec.status != "error":
                await self.launcher.mark_exited(rec)

    # -- the records the app asks about ------------------------------------------------
    def touch(self, rec: Record) -> None:
        self.records.touch(rec, time.time())

    def get(self, runtime_id: str) -> Record:
        return self.records.get_or_raise(runtime_id)

    def by_session_id(self, session_id: str) -> Record:
        return self.records.by_session_id(session_id)

    def runtimes(self) -> list[Record]:
        """What ``/list`` shows."""
        return list(self.records.values())

    def used_slots(self) -> float:
        return sum(slots_needed(r.resource_factor) for r in self.records.values() if holds_slot(r))

    def live_count(self) -> int:
        """Runtimes holding a slot: live ones, and failed ones whose container is not removed yet."""
        return sum(1 for r in self.records.values() if holds_slot(r))

    def admit(self, resource_factor: float) -> None:
        """``CapacityFull`` (429) unless a runtime of ``resource_factor`` fits (``placement.admits``)."""
        if not admits(self.config.max_runtimes, self.used_slots(), resource_factor):
            raise CapacityFull(
                f"this runtime server is full: {self.used_slots():g} of {self.config.max_runtimes} slot(s) in "
                f"use (--max-runtimes; a runtime takes resource_factor slots, this one "
                f"{slots_needed(resource_factor):g}); stop one (POST /stop) or retry later")

    async def refresh(self, rec: Record) -> None:
        """On a status poll: an immediate probe if running but not yet ready."""
        await self.launcher.refresh(rec)

    async def resolve(self, image: str, recipe: str | None = None, *, version: str | None = None) -> Any:
        return await self.resolving.resolve(image, recipe, version=version)

    async def image_size(self, hit: Any) -> int:
        return await self.resolving.image_size(hit)

    def info(self, rec: Record) -> RuntimeInfo:
        state = {"pending": "waiting", "running": "running", "ready": "running"}.get(rec.pod_status, "terminated")
        if rec.status == "paused":
            state = "paused"
        cs = ContainerStatus(state=state, ready=rec.pod_status == "ready" and rec.status == "running",
                             restart_count=rec.restart_count, exit_code=rec.exit_code, reason=rec.reason or None)
        return RuntimeInfo(
            runtime_id=rec.runtime_id, session_id=rec.session_id, url=rec.url,
            session_api_key=rec.session_api_key, status=rec.status, pod_status=rec.pod_status,
            image=rec.image, prebuilt_image=rec.prebuilt, base_image=rec.base, work_hosts={},
            restart_count=rec.restart_count, restart_reasons=[rec.reason] if rec.reason and rec.status == "error" else [],
            container_statuses=[cs], pod_logs=rec.pod_logs or None,
            run_as_user=rec.user if rec.user else "image", resource_factor=rec.resource_factor,
            created_at=rec.created_at, last_activity=rec.last_activity)

    # -- start ------------------------------------------------------------------------------
    async def start(self, req: StartRequest, *, hit: Any = None, runtime_id: str | None = None) -> Record:
        """A runtime for ``req``; ``hit`` and ``runtime_id`` when a front already resolved
        the image and named the runtime (a node of a fleet)."""
        rec = self.records.live_session(req.session_id)
        if rec is not None:
            log.info("runtime %s: /start for session %s which already runs: answering the same runtime",
                     rec.runtime_id, rec.session_id)
            self.touch(rec)
            return rec
        argv = parse_command(req.command)
        recipe = recipe_for_command(self.settings, argv)
        hit = hit or await self.resolving.resolve(req.image, recipe, version=req.agent_server_version)
        # from here to the record being indexed there is no await: check and reserve atomically
        rec = self.records.live_session(req.session_id)
        if rec is not None:
            return rec
        old = self.records.replace_session(req.session_id)
        if old is not None:
            self.launcher.cancel(old.runtime_id)
            self._chore(self._remove_quietly(old.container))
        self.admit(req.resource_factor)
        cport = agent_port(argv)
        hport = self.launcher.free_port()
        rid = runtime_id or secrets.token_hex(8)
        now = time.time()
        rec = Record(
            runtime_id=rid, session_id=req.session_id, container=f"imagefarm-rt-{rid}",
            image=req.image, prebuilt=pinned_image(hit), base=getattr(hit, "base", None) or None,
            host_port=hport, container_port=cport, url=f"http://{self.config.url_host}:{hport}",
            session_api_key=secrets.token_urlsafe(32), user=None, status="running", pod_status="pending",
            created_at=now, last_activity=now, resource_factor=float(req.resource_factor),
            extra={"size": getattr(hit, "size", None), "verified": bool(getattr(hit, "verified", False)),
                   "agent_server_version": getattr(hit, "agent_server_version", None),
                   "ready_paths": list(ready_paths(Path(self.settings.recipes_dir), recipe))})
        self.records.add(rec)
        self.launcher.launch(rec, req, argv)
        log.info("runtime %s: session %s, image %s -> %s, port %d -> %d",
                 rid, rec.session_id, req.image, rec.prebuilt, hport, cport)
        return rec

    async def _remove_quietly(self, name: str) -> None:
        try:
            await self.backend.remove(name)
        except BackendError as exc:
            log.warning("could not remove %s: %s", name, exc)

    # -- prefetch ---------------------------------------------------------------------------
    async def prefetch(self, req: PrefetchRequest) -> list[dict[str, Any]]:
        """Pull images onto this node in the background (``POST /prefetch``)."""
        out = []
        for image in req.images:
            hit = await self.resolving.resolve(image, req.recipe, version=req.agent_server_version)
            pinned, size = pinned_image(hit), await self.resolving.image_size(hit)
            pull = pinned not in self.images.present
            if pull:
                self._chore(self._prefetch_one(pinned, size))
            out.append({"image": image, "prebuilt_image": pinned, "node": self.server_id, "pull": pull, "warm": 0})
        return out

    async def _prefetch_one(self, image: str, size: int) -> None:
        try:
            await self.images.ensure(image, size=size)
        except BackendError as exc:
            log.warning("prefetch of %s failed: %s", image, exc)

    # -- pause / resume / stop --------------------------------------------------------------
    async def pause(self, rid: str) -> Record:
        rec = self.get(rid)
        if rec.status == "paused":
            return rec
        if rec.status != "running" or rec.pod_status == "pending":
            raise RuntimeServerError(f"runtime {rid} cannot be paused while {rec.status}/{rec.pod_status}")
        try:
            await self.backend.pause(rec.container)
        except BackendError as exc:
            # the cgroup freezer can give up on a busy container (runc: "unable to freeze"): once more
            log.warning("runtime %s: pause failed, trying once more: %s", rid, exc)
            await asyncio.sleep(0.5)
            await self.backend.pause(rec.container)
        rec.status = "paused"
        self.touch(rec)
        log.info("runtime %s paused", rid)
        return rec

    async def resume(self, rid: str) -> Record:
        rec = self.get(rid)
        if rec.status == "running":
            self.touch(rec)
            return rec
        if rec.status != "paused":
            raise RuntimeServerError(f"runtime {rid} cannot be resumed: it is {rec.status} ({rec.reason})")
        await self.backend.unpause(rec.container)
        rec.status = "running"
        rec.pod_status = "running"
        self.touch(rec)
        self.launcher.watch(rec)
        await self.refresh(rec)
        log.info("runtime %s resumed", rid)
        return rec

    async def stop(self, rid: str, why: str = "stopped") -> None:
        rec = self.get(rid)
        task = self.launcher.cancel(rid)  # a launch in flight
        self.records.forget(rid)
        if task is not None:
            # let a cancelled `podman run` die before removing, or the container could appear after
            await asyncio.wait([task], timeout=15)
        await self.backend.remove(rec.container)
        log.info("runtime %s (session %s) %s", rid, rec.session_id, why)

    # -- what GET /nodes and the metrics show ----------------------------------------------
    def counters(self) -> dict[str, int]:
        return {}

    def node_rows(self) -> list[dict[str, Any]]:
        """This server as its own only node."""
        states: dict[str, int] = {}
        for r in self.records.values():
            k = "paused" if r.status == "paused" else r.pod_status
            states[k] = states.get(k, 0) + 1
        cfg, st = self.config, self.images.stats
        return [{"node_id": self.server_id, "url": "(this server)", "address": cfg.url_host, "state": "up",
                 "ready": True, "slots": cfg.max_runtimes, "free_slots": max(0.0, cfg.max_runtimes - self.used_slots()),
                 "runtimes": states, "images": len(self.images.present), "last_report_s": 0.0,
                 "stats": {"pulls": st.pulls, "pull_bytes": st.bytes, "evictions": st.evictions,
                           "evicted_bytes": st.evicted_bytes, "cache_bytes": st.cache_bytes,
                           "cache_budget_bytes": self.images.budget}}]
