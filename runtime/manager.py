"""Runtimes on this node: resolve, start, pause, stop; persisted and reconciled.

One runtime is one podman container running a prebuilt agent-server image, labelled
``imagefarm.runtime=1``, ``imagefarm.runtime.server=<server id>`` (a node process's
node id), ``imagefarm.runtime.id=<runtime id>`` and ``imagefarm.runtime.session=<session
id>``, published on ``<publish address>:<host port from the range>`` to the agent
server's port (``--port N`` in the command, else 60000).

``RuntimeManager`` is split along its seams: ``ports.py`` (host ports), ``images.py``
(pull once, cache budget, LRU eviction), ``launch.py`` (launch and readiness),
``upkeep.py`` (monitor and reaping); this module keeps the records, their
reconciliation after a restart, and the verbs. ``/start`` answers at once (record
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
import functools
import logging
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from imagefarm.serve.apikey import check_key_config
from imagefarm.errors import ImagefarmError
from imagefarm.names.reference import parse
from imagefarm.settings import Settings

from .backend import LABEL, LABEL_ID, LABEL_SERVER, PodmanBackend
from .errors import BackendError, CapacityFull, NoPrebuiltImage, RuntimeServerError, UnknownRuntime
from .images import NodeImages
from .launch import Launching, _Live
from .models import ContainerStatus, RuntimeInfo, StartRequest
from .ports import PortPool, agent_port, parse_command
from .resolver import Resolver, describe_base, ready_paths, recipe_for_command
from .state import Record, Store
from .upkeep import LIVE, Upkeep

log = logging.getLogger("imagefarm.runtime")



@dataclass
class ServeConfig:
    api_key: str | None = None
    disable_auth: bool = False
    max_runtimes: int = 32
    port_range: tuple[int, int] = (30000, 39999)
    idle_timeout: float = 3600.0          #: seconds; 0 = never reap
    publish_address: str = "127.0.0.1"    #: where container ports are published
    public_host: str | None = None        #: host in the URLs handed out (default: see url_host)
    cpus_per_factor: float = 1.0
    memory_mib_per_factor: int = 4096
    pids_limit: int = 4096
    user_policy: Literal["image", "requested"] = "image"
    stop_on_exit: bool = False            #: remove every runtime when the server stops (SLURM)
    failed_ttl: float = 600.0
    ready_timeout: float = 900.0
    monitor_interval: float = 1.0
    log_tail: int = 50
    max_body: int = 1 << 20               #: bytes of a request body (413 beyond)
    state_dir: Path | None = None         #: default: settings.state_dir / "runtime"
    image_cache_gib: float | None = None  #: disk budget for images; idle ones evicted LRU first
    clean_start: bool = False             #: remove every container of this node at start-up (node processes)

    def __post_init__(self) -> None:
        lo, hi = self.port_range
        if not (1024 <= lo <= hi <= 65535):
            raise ImagefarmError(f"invalid port range {lo}-{hi}: expected A-B within 1024-65535")
        check_key_config(self.api_key, self.disable_auth, "IMAGEFARM_RUNTIME_API_KEY")
        if self.max_runtimes < 1:
            raise ImagefarmError("--max-runtimes must be at least 1")
        if self.image_cache_gib is not None and not self.image_cache_gib > 0:
            raise ImagefarmError("--image-cache-gib must be a positive number of GiB")
        if not self.cpus_per_factor >= 0.01:  # podman reads a tiny --cpus as no limit
            raise ImagefarmError(f"--cpus-per-factor {self.cpus_per_factor}: expected at least 0.01")
        if self.memory_mib_per_factor < 6:  # podman's floor; --memory 0m means no limit
            raise ImagefarmError(f"--memory-mib-per-factor {self.memory_mib_per_factor}: expected at least 6")

    @property
    def url_host(self) -> str:
        if self.public_host:
            return self.public_host
        if self.publish_address in ("", "0.0.0.0", "::"):
            return socket.getfqdn()
        return self.publish_address

    @property
    def probe_host(self) -> str:
        return "127.0.0.1" if self.publish_address in ("", "0.0.0.0", "::") else self.publish_address


class Resolving:
    """Resolution and image sizes, shared by a node's manager and a fleet's front
    (needs ``resolver``, ``to``, ``settings``, ``_sizes`` and ``_registry``)."""

    async def resolve(self, image: str, recipe: str | None = None, *, version: str | None = None):
        """The resolver's hit for ``image`` of ``recipe`` (None: the settings'; the caller
        takes it from the client's command with ``recipe_for_command``) at agent-server
        ``version`` (None: the resolver's default); ``NoPrebuiltImage`` without one."""
        parse(image)  # InvalidReference (400) before any registry traffic
        ask = {k: v for k, v in (("recipe", recipe), ("version", version)) if v}
        hit = await asyncio.to_thread(functools.partial(self.resolver.resolve, image, **ask))
        if hit is None:
            raise NoPrebuiltImage(image, describe_base(image), self.to, recipe=recipe, version=version)
        return hit

    async def image_size(self, hit: Any) -> int:
        """Bytes of the prebuilt image (config + layers, compressed), from the hit or the registry."""
        size = getattr(hit, "size", None)
        if size:
            return int(size)
        pinned = pinned_image(hit)
        if pinned not in self._sizes:
            def fetch() -> int:
                from imagefarm.registry import RegistryClient

                if self._registry is None:
                    self._registry = RegistryClient(self.settings)
                m = self._registry.resolve(parse(pinned)).manifest
                return m.config.size + sum(layer.size for layer in m.layers)
            try:
                self._sizes[pinned] = await asyncio.to_thread(fetch)
            except (ImagefarmError, OSError) as exc:
                log.info("size of %s unknown: %s", pinned, exc)
                return 0
        return self._sizes[pinned]


class RuntimeManager(Launching, Upkeep, Resolving):
    def __init__(self, settings: Settings, backend: PodmanBackend, resolver: Resolver,
                 config: ServeConfig) -> None:
        self.settings = settings
        self.backend = backend
        self.resolver = resolver
        self.config = config
        self.to = str(settings.prefix)
        self.store = Store(config.state_dir or settings.state_dir / "runtime")
        self.server_id = ""
        self.records: dict[str, Record] = {}
        self.by_session: dict[str, str] = {}
        self.live: dict[str, _Live] = {}
        budget = int(config.image_cache_gib * 2**30) if config.image_cache_gib else None
        self.images = NodeImages(settings, backend, self.store, budget_bytes=budget,
                                 in_use=lambda: {r.prebuilt for r in self.records.values()})
        self.ports = PortPool(config.port_range, config.publish_address)
        self._sizes: dict[str, int] = {}
        self._chores: set[asyncio.Task] = set()
        self._ticks = 0
        self._registry: Any = None
        self._bg: list[asyncio.Task] = []
        self._http: httpx.AsyncClient | None = None
        #: called with each record whose state changed (a node reports it to its front)
        self.on_change: list = []
        #: called with (record, seconds from /start to ready)
        self.on_ready: list = []

    # -- lifecycle ------------------------------------------------------------------
    async def startup(self) -> None:
        self.store.lock()
        self.server_id = self.store.server_id()
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(2.0, connect=1.0), trust_env=False)
        for rec in self.store.all():
            self._index(rec)
        if self.config.clean_start:
            await self._clean_start()
        await self.reconcile()
        await self.images.scan()
        self._bg = [asyncio.create_task(self._monitor_loop(), name="runtime-monitor"),
                    asyncio.create_task(self._reaper_loop(), name="runtime-reaper")]
        log.info("runtime server %s: %d runtime(s) found again, cap %d, ports %d-%d, idle timeout %s",
                 self.server_id, len(self.records), self.config.max_runtimes, *self.config.port_range,
                 f"{self.config.idle_timeout:g}s" if self.config.idle_timeout else "off")

    async def shutdown(self) -> None:
        for t in self._bg + [lv.task for lv in self.live.values() if lv.task]:
            t.cancel()
        await asyncio.gather(*self._bg, *[lv.task for lv in self.live.values() if lv.task],
                             return_exceptions=True)
        if self.config.stop_on_exit and self.records:
            log.info("stopping %d runtime(s) on exit (--stop-on-exit)", len(self.records))
            await self.backend.remove(*[r.container for r in self.records.values()])
            for rid in list(self.records):
                self._forget(rid)
        elif self.records:
            log.info("leaving %d runtime(s) running; a restarted server finds them again", len(self.records))
        release = getattr(self.backend, "release", None)
        if release is not None:  # no mount left behind under the state directory
            with contextlib.suppress(Exception):
                if gone := await release():
                    log.info("released %d mount(s) podman left under the state directory", len(gone))
        if self._http:
            await self._http.aclose()
        if self._registry is not None:
            self._registry.close()
        self.store.close()

    async def _clean_start(self) -> None:
        """A node process starting again: what it left is no one's any more (its front
        reported those runtimes failed when it stopped answering). Remove it all."""
        mine = await self.backend.list({LABEL_SERVER: self.server_id})
        if mine or self.records:
            log.warning("node %s starting again: removing the %d container(s) and %d record(s) it left",
                        self.server_id, len(mine), len(self.records))
            await self.backend.remove(*[c.name for c in mine])
        for rid in list(self.records):
            self._forget(rid)

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
                self._forget(rid)
            elif c.state == "running":
                rec.status, rec.pod_status = "running", "running"
                self._watch(rec)
            elif c.state == "paused":
                rec.status = "paused"
                self._save(rec)
            elif c.state in ("created", "configured", "initialized"):
                log.warning("runtime %s was never started (server crashed while creating it); removing it", rid)
                await self.backend.remove(rec.container)
                self._forget(rid)
            elif rec.status != "error":
                await self._mark_exited(rec)

    # -- bookkeeping --------------------------------------------------------------------
    def _index(self, rec: Record) -> None:
        self.records[rec.runtime_id] = rec
        self.by_session[rec.session_id] = rec.runtime_id
        self.live.setdefault(rec.runtime_id, _Live())

    def _save(self, rec: Record) -> None:
        self.store.put(rec)
        for fn in self.on_change:
            fn(rec)

    def _forget(self, rid: str) -> None:
        rec = self.records.pop(rid, None)
        if rec and self.by_session.get(rec.session_id) == rid:
            del self.by_session[rec.session_id]
        lv = self.live.pop(rid, None)
        if lv and lv.task and lv.task is not asyncio.current_task():
            lv.task.cancel()
        self.store.delete(rid)
        if rec:
            for fn in self.on_change:
                fn(rec)

    def touch(self, rec: Record) -> None:
        rec.last_activity = time.time()
        self._save(rec)

    def get(self, runtime_id: str) -> Record:
        rec = self.records.get(runtime_id)
        if rec is None:
            raise UnknownRuntime(f"no runtime {runtime_id!r} on this server (stopped, reaped or never started)")
        return rec

    def by_session_id(self, session_id: str) -> Record:
        rid = self.by_session.get(session_id)
        if rid is None:
            raise UnknownRuntime(f"no runtime for session {session_id!r}")
        return self.records[rid]

    def live_count(self) -> int:
        """Runtimes holding a slot of ``--max-runtimes``: live ones, and failed ones whose
        container is not removed yet (a failed container may still run and use the node)."""
        return sum(1 for r in self.records.values() if r.status in LIVE or not r.extra.get("removed"))

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
        existing = self.by_session.get(req.session_id)
        if existing and self.records[existing].status in LIVE:
            rec = self.records[existing]
            log.info("runtime %s: /start for session %s which already runs: answering the same runtime",
                     rec.runtime_id, rec.session_id)
            self.touch(rec)
            return rec
        argv = parse_command(req.command)
        recipe = recipe_for_command(self.settings, argv)
        hit = hit or await self.resolve(req.image, recipe, version=req.agent_server_version)
        # from here to the record being indexed there is no await: check and reserve atomically
        existing = self.by_session.get(req.session_id)
        if existing:
            rec = self.records[existing]
            if rec.status in LIVE:
                return rec
            old = rec.container
            self._forget(existing)
            task = asyncio.create_task(self._remove_quietly(old))
            self._chores.add(task)
            task.add_done_callback(self._chores.discard)
        if self.live_count() >= self.config.max_runtimes:
            raise CapacityFull(
                f"this runtime server is full: {self.config.max_runtimes} runtimes run (--max-runtimes); "
                "stop one (POST /stop) or retry later")
        cport = agent_port(argv)
        hport = self._free_port()
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
        self._index(rec)
        self._save(rec)
        lv = self.live[rid]
        lv.task = asyncio.create_task(self._launch(rec, req, argv), name=f"launch-{rid}")
        log.info("runtime %s: session %s, image %s -> %s, port %d -> %d",
                 rid, rec.session_id, req.image, rec.prebuilt, hport, cport)
        return rec

    def _free_port(self) -> int:
        return self.ports.take(r.host_port for r in self.records.values())

    async def _remove_quietly(self, name: str) -> None:
        try:
            await self.backend.remove(name)
        except BackendError as exc:
            log.warning("could not remove %s: %s", name, exc)

    async def _ensure_image(self, rec: Record, req: StartRequest) -> None:
        size = int(rec.extra.get("size") or 0)
        if await self.images.ensure(rec.prebuilt, size=size, policy=req.image_pull_policy):
            rec.extra["pulled"] = True

    # -- prefetch ---------------------------------------------------------------------------
    async def prefetch(self, images: list[str]) -> list[dict[str, Any]]:
        """Pull images onto this node in the background (``POST /prefetch``)."""
        out = []
        for image in images:
            hit = await self.resolve(image)
            pinned, size = pinned_image(hit), await self.image_size(hit)
            pull = pinned not in self.images.present
            if pull:
                task = asyncio.create_task(self._prefetch_one(pinned, size), name=f"prefetch-{pinned[-12:]}")
                self._chores.add(task)
                task.add_done_callback(self._chores.discard)
            out.append({"image": image, "prebuilt_image": pinned, "node": self.server_id, "pull": pull})
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
        self._watch(rec)
        await self.refresh(rec)
        log.info("runtime %s resumed", rid)
        return rec

    async def stop(self, rid: str, why: str = "stopped") -> None:
        rec = self.get(rid)
        lv = self.live.get(rid)
        task = lv.task if lv else None
        self._forget(rid)  # cancels a launch in flight
        if task is not None and task is not asyncio.current_task():
            # let a cancelled `podman run` die before removing, or the container could appear after
            await asyncio.wait([task], timeout=15)
        await self.backend.remove(rec.container)
        log.info("runtime %s (session %s) %s", rid, rec.session_id, why)

def pinned_image(hit: Any) -> str:
    """``repo@sha256:...`` from a resolver hit (``.pinned`` if it has one, else ``.image``)."""
    image = getattr(hit, "pinned", None) or hit.image
    if "@" in image:
        return image
    return parse(image).with_digest(hit.digest).pinned
