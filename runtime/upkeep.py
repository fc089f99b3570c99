"""Monitor and reaping of a node's runtimes: exits noticed, idle and failed ones removed.

A monitor notices containers that exit after they were ready (one ``podman ps`` per
tick for all); a reaper removes runtimes idle longer than ``idle_timeout`` (idle = no
API call for the runtime other than status polls and, where the agent server tells, no agent activity per
``GET {url}/server_info`` ``idle_time``; else no CPU time used) and failed ones after
``failed_ttl``. ``Upkeep`` is given what it reads (podman, the records, the launcher
whose watches it leaves alone) and removes runtimes through the ``stop`` it is given.
"""

from __future__ import annotations

import asyncio
import logging
import time

from typing import Awaitable, Callable

import httpx

from .backend import LABEL_ID, LABEL_SERVER, PodmanBackend
from .config import ServeConfig
from .launcher import Launcher
from .records import LIVE, Records
from .state import Record

log = logging.getLogger("imagefarm.runtime")


class Upkeep:
    def __init__(self, *, server_id: str, backend: PodmanBackend, config: ServeConfig, records: Records,
                 launcher: Launcher, http: httpx.AsyncClient,
                 stop: Callable[[str, str], Awaitable[None]]) -> None:
        self.server_id, self.backend, self.config, self.records = server_id, backend, config, records
        self.launcher, self.http, self.stop = launcher, http, stop
        self._ticks = 0
        self._cpu: dict[str, float | None] = {}  #: last CPU-time sample per runtime (activity when it grows)
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._monitor_loop(), name="runtime-monitor"),
                       asyncio.create_task(self._reaper_loop(), name="runtime-reaper")]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.monitor_interval)
            try:
                await self._monitor_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("runtime monitor tick failed")

    async def _sweep_orphans(self) -> None:
        """Remove containers of this server that no record owns (e.g. a start cancelled mid-way)."""
        known = {r.container for r in self.records.values()}
        orphans = [c.name for c in await self.backend.list({LABEL_SERVER: self.server_id})
                   if c.name not in known and c.labels.get(LABEL_ID) not in self.records]
        if orphans:
            log.warning("removing %d container(s) of this server without a runtime record: %s",
                        len(orphans), ", ".join(orphans))
            await self.backend.remove(*orphans)

    async def _monitor_once(self) -> None:
        self._ticks += 1
        if self._ticks % 60 == 0:
            await self._sweep_orphans()
        watched = [r for r in self.records.values()
                   if r.status in LIVE and r.pod_status != "pending"
                   and not self.launcher.busy(r.runtime_id)]
        if not watched:
            return
        containers = {c.labels.get(LABEL_ID, ""): c for c in await self.backend.list({LABEL_SERVER: self.server_id})}
        for rec in watched:
            if rec.runtime_id not in self.records:
                continue
            c = containers.get(rec.runtime_id)
            if c is None or c.state in ("exited", "stopped", "dead", "removing"):
                await self.launcher.mark_exited(rec, await self.backend.inspect(rec.container) if c else None)
            elif c.state == "paused" and rec.status != "paused":
                rec.status = "paused"
                self.records.save(rec)
            elif c.state == "running" and rec.status == "paused":
                rec.status = "running"
                self.launcher.watch(rec)

    async def _reaper_loop(self) -> None:
        idle = self.config.idle_timeout
        interval = max(0.5, min(30.0, (idle / 4) if idle else 30.0, self.config.failed_ttl / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                await self._reap_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("runtime reaper tick failed")

    async def _agent_activity(self, rec: Record) -> float | None:
        """When the agent server last did something, per its /server_info (None if unknown)."""
        try:
            r = await self.http.get(f"http://{self.config.probe_host}:{rec.host_port}/server_info", timeout=2.0)
            if r.status_code == 200:
                idle = r.json().get("idle_time")
                if isinstance(idle, (int, float)):
                    return time.time() - float(idle)
        except (httpx.HTTPError, ValueError):
            pass
        return None

    async def _reap_once(self) -> None:
        now = time.time()
        for rec in [r for r in self.records.values() if r.status == "error"]:
            if now - rec.last_activity > self.config.failed_ttl:
                await self.stop(rec.runtime_id, "removed (failed and untouched)")
            elif not rec.extra.get("removed"):
                await self.launcher.remove_failed(rec)
        idle = self.config.idle_timeout
        if not idle:
            return
        candidates = [r for r in self.records.values() if r.status in LIVE and now - r.last_activity > idle]
        if not candidates:
            return
        need_cpu = []
        for rec in candidates:
            if rec.status == "running" and rec.pod_status == "ready":
                seen = await self._agent_activity(rec)
                if seen is not None:
                    rec.last_activity = max(rec.last_activity, seen)
                    continue
            if rec.status == "running":
                need_cpu.append(rec)
        first_sample = set()
        if need_cpu:
            times = await self.backend.cpu_times([r.container for r in need_cpu])
            for rec in need_cpu:
                cpu, last = times.get(rec.container), self._cpu.get(rec.runtime_id)
                if last is None:
                    first_sample.add(rec.runtime_id)  # two samples are needed to see activity
                elif cpu is not None and cpu - last > 0.05:
                    rec.last_activity = now
                self._cpu[rec.runtime_id] = cpu if cpu is not None else last
        for rid in [r for r in self._cpu if r not in self.records]:
            del self._cpu[rid]
        for rec in candidates:
            if rec.runtime_id in first_sample:
                continue
            if rec.runtime_id in self.records and now - rec.last_activity > idle:
                await self.stop(rec.runtime_id, f"reaped after {now - rec.last_activity:.0f}s idle "
                                                f"(--idle-timeout {idle:g}s)")
