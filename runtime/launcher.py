"""Launch and readiness of a runtime on this node: pull, ``podman run``, probe until ready.

A background task per runtime has the image pulled if the node lacks it
(``pod_status`` pending), creates the container (running) and probes ``{url}/alive``
then ``{url}/health`` every 20 ms until both answer (ready), or reports the exit with
the container's last log lines (failed; an OOM kill is reported as
crashloopbackoff, which both clients explain as "possibly OOM, try again").
``Launcher`` is given what it uses (podman, the images, ports, the records) and
reports back through the records (each change) and ``on_ready`` (seconds to ready).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable

import httpx

from imagefarm.errors import ImagefarmError

from .backend import LABEL, LABEL_ID, LABEL_SERVER, LABEL_SESSION, ContainerSpec, PodmanBackend
from .config import ServeConfig
from .errors import BackendError, RuntimeServerError
from .images import NodeImages
from .models import StartRequest
from .ports import PortPool
from .records import Records
from .resolver import DEFAULT_READY
from .state import Record

log = logging.getLogger("imagefarm.runtime")


class Launcher:
    def __init__(self, *, server_id: str, backend: PodmanBackend, config: ServeConfig, images: NodeImages,
                 ports: PortPool, records: Records, http: httpx.AsyncClient,
                 on_ready: list[Callable[[Record, float], None]]) -> None:
        self.server_id, self.backend, self.config = server_id, backend, config
        self.images, self.ports, self.records, self.http = images, ports, records, http
        self.on_ready = on_ready
        self.tasks: dict[str, asyncio.Task] = {}  #: launch or readiness watch in flight, per runtime

    # -- tasks --------------------------------------------------------------------------
    def launch(self, rec: Record, req: StartRequest, argv: list[str]) -> None:
        self._track(rec.runtime_id, self._launch(rec, req, argv), f"launch-{rec.runtime_id}")

    def _track(self, rid: str, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self.tasks[rid] = task

        def done(t: asyncio.Task) -> None:
            if self.tasks.get(rid) is t:
                del self.tasks[rid]
        task.add_done_callback(done)

    def busy(self, rid: str) -> bool:
        return rid in self.tasks

    def cancel(self, rid: str) -> asyncio.Task | None:
        """Cancel what runs for ``rid``; the task (to wait for) unless it is the caller."""
        task = self.tasks.pop(rid, None)
        if task is None or task is asyncio.current_task():
            return None
        task.cancel()
        return task

    async def cancel_all(self) -> None:
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def free_port(self) -> int:
        return self.ports.take(r.host_port for r in self.records.values())

    async def ensure_image(self, rec: Record, req: StartRequest) -> None:
        size = int(rec.extra.get("size") or 0)
        if await self.images.ensure(rec.prebuilt, size=size, policy=req.image_pull_policy):
            rec.extra["pulled"] = True

    async def _launch(self, rec: Record, req: StartRequest, argv: list[str]) -> None:
        t0 = time.monotonic()
        try:
            await self.ensure_image(rec, req)
            env = dict(req.environment)
            multiline = sorted(k for k, v in env.items() if "\n" in v or "\r" in v)
            if multiline:
                log.warning("runtime %s: newlines in %s became spaces (podman env files hold one line "
                            "per variable)", rec.runtime_id, ", ".join(multiline))
            if "SESSION_API_KEY" in env:
                log.warning("runtime %s: the request's SESSION_API_KEY is replaced by the server's own",
                            rec.runtime_id)
            env["SESSION_API_KEY"] = rec.session_api_key
            env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            user, extra = await self._user_decision(rec, req, env)
            if req.runtime_class and req.runtime_class not in ("runc", "default"):
                log.info("runtime %s: runtime_class %r ignored: this server runs podman with runc",
                         rec.runtime_id, req.runtime_class)
            factor = rec.resource_factor
            spec = ContainerSpec(
                name=rec.container, image=rec.prebuilt, argv=argv, env=env,
                labels={LABEL: "1", LABEL_SERVER: self.server_id, LABEL_ID: rec.runtime_id,
                        LABEL_SESSION: rec.session_id},
                publish=[(self.config.publish_address, rec.host_port, rec.container_port)],
                working_dir=req.working_dir or None, user=user,
                cpus=min(self.config.cpus_per_factor * factor, float(os.cpu_count() or 1)),
                memory=f"{int(self.config.memory_mib_per_factor * factor)}m",
                pids_limit=self.config.pids_limit, extra=extra)
            for attempt in range(3):
                try:
                    await self.backend.run(spec)
                    break
                except BackendError as exc:
                    if exc.kind == BackendError.WORKDIR_MISSING and spec.working_dir and attempt < 2:
                        await self.backend.remove(rec.container)
                        log.info("runtime %s: working_dir %s does not exist in the image: the image's own "
                                 "working directory is used", rec.runtime_id, spec.working_dir)
                        spec.working_dir = None
                        continue
                    if spec.image in self.images.present and exc.kind == BackendError.IMAGE_UNKNOWN and attempt < 2:
                        self.images.present.discard(spec.image)  # removed behind our back: pull again
                        await self.backend.remove(rec.container)
                        await self.ensure_image(rec, req)
                        continue
                    if exc.kind == BackendError.PORT_IN_USE and attempt < 2:
                        await self.backend.remove(rec.container)
                        rec.host_port = self.free_port()
                        rec.url = f"http://{self.config.url_host}:{rec.host_port}"
                        spec.publish = [(self.config.publish_address, rec.host_port, rec.container_port)]
                        log.info("runtime %s: port taken, retrying on %d", rec.runtime_id, rec.host_port)
                        continue
                    raise
            rec.pod_status = "running"
            self.records.save(rec)
            log.info("runtime %s: container created in %.2fs", rec.runtime_id, time.monotonic() - t0)
            await self._wait_ready(rec, t0)
        except asyncio.CancelledError:
            raise
        except RuntimeServerError as exc:
            await self.fail(rec, str(exc))
        except ImagefarmError as exc:
            await self.fail(rec, str(exc))
        except Exception as exc:  # noqa: BLE001 - a launch must never die silently
            log.exception("runtime %s: launch failed", rec.runtime_id)
            await self.fail(rec, f"internal error: {exc}")

    async def _user_decision(self, rec: Record, req: StartRequest, env: dict[str, str]) -> tuple[str | None, list[str]]:
        image_user = await self.images.image_user(rec.prebuilt)
        wanted = req.run_as_user
        if self.config.user_policy == "requested" and wanted is not None:
            gid = req.run_as_group if req.run_as_group is not None else (req.fs_group if req.fs_group is not None else wanted)
            env.setdefault("HOME", "/tmp")
            rec.user = f"{wanted}:{gid}"
            extra = ["--group-add", str(req.fs_group)] if req.fs_group is not None and req.fs_group != gid else []
            log.info("runtime %s: runs as %s as requested (policy requested, HOME=%s)",
                     rec.runtime_id, rec.user, env["HOME"])
            return rec.user, extra
        rec.user = None
        if wanted is not None and str(wanted) != (image_user or "0") and not (wanted == 0 and not image_user):
            log.info("runtime %s: requested run_as_user %s not applied: runs as the image's own user %s "
                     "(policy image: r2e images are root-owned with no user %s; only the image user can "
                     "write the working tree, e.g. /testbed)",
                     rec.runtime_id, wanted, image_user or "root", wanted)
        return None, []

    async def probe(self, rec: Record) -> bool:
        base = f"http://{self.config.probe_host}:{rec.host_port}"
        try:
            for path in rec.extra.get("ready_paths") or DEFAULT_READY:
                r = await self.http.get(base + path, timeout=2.0)
                if not 200 <= r.status_code < 300:
                    return False
            return True
        except httpx.HTTPError:
            return False

    async def _wait_ready(self, rec: Record, t0: float) -> None:
        """Probe until the agent server answers. A refused connect on the node costs
        microseconds, so the first minute probes every 20 ms; whether the container
        died is asked of podman (100+ ms) in a task beside the probes, never in their way."""
        deadline = time.monotonic() + self.config.ready_timeout
        last_check, inspecting = time.monotonic(), None
        try:
            while rec.runtime_id in self.records and rec.status == "running":
                if await self.probe(rec):
                    self._set_ready(rec, t0)
                    return
                now = time.monotonic()
                if inspecting is not None and inspecting.done():
                    c = inspecting.result()
                    inspecting = None
                    if c is None or c.state not in ("running", "paused", "created", "configured", "initialized"):
                        await self.mark_exited(rec, c)
                        return
                if inspecting is None and now - last_check > 1.0:
                    last_check = now
                    inspecting = asyncio.create_task(self.backend.inspect(rec.container))
                if now > deadline:
                    await self.fail(rec, f"the agent server did not answer {rec.url}/alive within "
                                          f"{self.config.ready_timeout:g}s", logs=True)
                    return
                await asyncio.sleep(0.02 if now - t0 < 60 else 0.5)
        finally:
            if inspecting is not None and not inspecting.done():
                inspecting.cancel()

    def _set_ready(self, rec: Record, t0: float | None) -> None:
        if rec.pod_status == "ready":
            return
        rec.pod_status = "ready"
        rec.ready_at = time.time()
        self.records.save(rec)
        if t0 is not None:
            log.info("runtime %s: ready in %.2fs after /start", rec.runtime_id, time.monotonic() - t0)
            for fn in self.on_ready:
                fn(rec, time.monotonic() - t0)

    async def mark_exited(self, rec: Record, c=None) -> None:
        c = c or await self.backend.inspect(rec.container)
        if c is None:
            await self.fail(rec, "the container disappeared (removed outside this server?)", logs=False)
            return
        why = f"the container exited with code {c.exit_code}" + (f": {c.error}" if c.error else "")
        oom = c.oom_killed
        if not oom and c.exit_code == 137:
            # SIGKILL under the memory limit: on cgroup v1 hosts (these) podman never sets
            # OOMKilled, though the kernel logged an OOM kill; this server never SIGKILLs a
            # runtime it still tracks, so an OOM kill is by far the likeliest cause
            oom = True
            why += (f" (SIGKILL under the {int(self.config.memory_mib_per_factor * rec.resource_factor)} MiB "
                    "memory limit: most likely out of memory; podman here cannot tell for sure)")
        await self.fail(rec, why, exit_code=c.exit_code, oom=oom)

    async def fail(self, rec: Record, reason: str, *, exit_code: int | None = None, oom: bool = False,
                    logs: bool = True) -> None:
        if rec.runtime_id not in self.records:
            return
        tail = ""
        if logs:
            try:
                tail = await self.backend.logs(rec.container, self.config.log_tail)
            except BackendError:
                tail = ""
        hint = ""
        low = (reason + tail).lower()
        if "executable file not found" in low or "no such file or directory" in low and "/openhands/" in low:
            hint = (" (the command does not exist in this image: agent-server images serve SDK clients "
                    "(APIRemoteWorkspace, command /usr/local/bin/openhands-agent-server); a V0 "
                    "RemoteRuntime's action execution server is not in them)")
        await self.remove_failed(rec)  # before the failure shows: a failed poll means it is gone
        rec.status = "error"
        rec.pod_status = "crashloopbackoff" if oom else "failed"
        rec.reason = ("OOMKilled: " if oom else "") + reason + hint
        rec.exit_code = exit_code
        rec.pod_logs = (tail or reason).strip()[-8000:]
        rec.last_activity = time.time()
        self.records.save(rec)
        lines = [ln for ln in tail.strip().splitlines() if ln][-5:]
        log.warning("runtime %s failed: %s%s", rec.runtime_id, rec.reason,
                    ("; last log lines:\n    " + "\n    ".join(lines)) if lines else "")

    async def remove_failed(self, rec: Record) -> None:
        """A failed runtime's container goes at once (its logs are in the record); until
        podman confirms, it keeps its slot and the reaper tries again."""
        try:
            await self.backend.remove(rec.container)
        except BackendError as exc:
            log.warning("runtime %s: could not remove the failed container yet: %s", rec.runtime_id, exc)
            return
        rec.extra["removed"] = True
        if rec.runtime_id in self.records:
            self.records.save(rec)

    def watch(self, rec: Record) -> None:
        """(Re)start readiness watching for a running, not yet ready runtime."""
        if not self.busy(rec.runtime_id):
            rec.pod_status = "running"
            self.records.save(rec)
            self._track(rec.runtime_id, self._wait_ready(rec, None), f"watch-{rec.runtime_id}")

    async def refresh(self, rec: Record) -> None:
        """On a status poll: an immediate probe if running but not yet ready."""
        if rec.status == "running" and rec.pod_status == "running" and await self.probe(rec):
            self._set_ready(rec, None)
