"""The container backend: the podman CLI, driven through asyncio subprocesses.

Why the CLI and not the ``docker`` SDK against podman's Docker-compatible socket:

* no service to run: the socket needs ``podman system service`` kept alive next to
  the server (no systemd socket activation on SLURM nodes, one more process to
  supervise, restart and clean up when a job ends);
* the same configuration path as the rest of imagefarm: every call gets the project's
  own ``containers.conf`` (runc, ulimits, cgroupfs), ``registries.conf`` and the
  storage under ``settings.state_dir`` through ``imagefarm.host.containers.container_env``,
  so the images the farm pulled and verified are the ones the server starts;
* asyncio subprocesses never block the event loop, and each call is one small,
  logged, reproducible command line (copy it into a shell to debug);
* one less dependency (``docker`` on PyPI) whose compat-API coverage of podman 4.3
  (pause under cgroupfs, ``--pids-limit``, labels filters) would need its own tests.

The cost is ~30-60 ms of podman start-up per call, paid off the request path (the
start itself runs in a background task) and batched where it matters (one ``podman
ps`` per monitor tick for all containers).

Secrets never appear on a command line: the environment (``SESSION_API_KEY`` and the
request's variables) goes through an ``--env-file`` written 0600 and removed at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from imagefarm.host.containers import container_env, release_mounts, reserved_ports, which
from imagefarm.settings import Settings
from imagefarm.host.statedir import state_subdir

from .errors import BackendError

log = logging.getLogger("imagefarm.runtime.backend")

LABEL = "imagefarm.runtime"
LABEL_SERVER = "imagefarm.runtime.server"
LABEL_ID = "imagefarm.runtime.id"
LABEL_SESSION = "imagefarm.runtime.session"


@dataclass
class ContainerSpec:
    name: str
    image: str
    argv: list[str]
    env: dict[str, str]
    labels: dict[str, str]
    publish: list[tuple[str, int, int]]  #: (host address, host port, container port)
    working_dir: str | None = None
    user: str | None = None
    cpus: float | None = None
    memory: str | None = None
    pids_limit: int | None = None
    tls_verify: bool = True
    extra: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ImageInfo:
    id: str
    names: tuple[str, ...]   #: repo@sha256:... digests and repo:tag names
    size: int                #: bytes on disk as podman counts them (shared layers counted in each)
    containers: int = 0


@dataclass
class ContainerInfo:
    id: str
    name: str
    state: str          #: created / running / paused / exited / stopped / ...
    exit_code: int | None
    labels: dict[str, str]
    oom_killed: bool = False
    error: str = ""


class PodmanBackend:
    """Async verbs over ``podman``; every method raises ``BackendError`` with stderr."""

    def __init__(self, settings: Settings, *, timeout: float = 600.0) -> None:
        self.settings = settings
        self.exe = which("podman")
        self.env = container_env(settings)
        self.timeout = timeout
        self._tmp = settings.state_dir / "runtime" / "tmp"

    async def release(self) -> list[str]:
        """On stop: unmount what podman left under the state directory when no container runs."""
        import asyncio

        return await asyncio.to_thread(release_mounts, self.settings)

    async def _run(self, *args: str, check: bool = True, timeout: float | None = None,
                   merge: bool = False, finish: bool = False) -> tuple[int, str, str]:
        """One podman verb. Cancelled, it is killed, unless ``finish``: then it runs to
        its end first (``podman run`` killed between runc create and runc start leaves
        conmon and ``runc init`` running, which no podman verb finds again)."""
        t0 = time.monotonic()
        log.debug("podman %s", " ".join(args))
        proc = await asyncio.create_subprocess_exec(
            self.exe, *args, env=self.env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT if merge else asyncio.subprocess.PIPE)
        talk = asyncio.ensure_future(proc.communicate())
        try:
            out, err = await asyncio.wait_for(asyncio.shield(talk), timeout or self.timeout)
        except asyncio.CancelledError:
            if finish:
                try:
                    await asyncio.wait_for(talk, timeout or self.timeout)
                except (asyncio.TimeoutError, asyncio.CancelledError):
                    pass
            _kill(proc)
            try:  # reap it now: a transport collected after the loop closed warns
                await asyncio.wait_for(talk, 5)
            finally:
                raise
        except asyncio.TimeoutError:
            _kill(proc)
            await talk
            raise BackendError(f"`podman {' '.join(args[:2])}` timed out after {timeout or self.timeout}s",
                               BackendError.TIMEOUT) from None
        so = out.decode(errors="replace")
        se = (err or b"").decode(errors="replace")
        log.debug("podman %s -> %s in %.3fs", args[0], proc.returncode, time.monotonic() - t0)
        if check and proc.returncode != 0:
            tail = "\n".join(se.strip().splitlines()[-10:]) or so.strip()[-2000:]
            raise BackendError.from_podman(f"`podman {' '.join(args[:2])}` failed (exit {proc.returncode}): {tail}",
                                           se or so)
        return proc.returncode or 0, so, se

    # -- images ---------------------------------------------------------------
    async def image_exists(self, image: str) -> bool:
        rc, _, _ = await self._run("image", "exists", image, check=False, timeout=60)
        return rc == 0

    async def pull(self, image: str, *, tls_verify: bool = True) -> None:
        args = ["pull", "--quiet"]
        if not tls_verify:
            args.append("--tls-verify=false")
        await self._run(*args, image)

    async def images(self) -> list["ImageInfo"]:
        """Every image in this node's storage, with the digests it can be named by."""
        _, out, _ = await self._run("images", "--format", "json", timeout=60)
        found = []
        for i in json.loads(out or "[]") or []:
            names = tuple(i.get("RepoDigests") or ()) + tuple(i.get("Names") or ())
            found.append(ImageInfo(id=i.get("Id", ""), names=names, size=int(i.get("Size") or 0),
                                   containers=int(i.get("Containers") or 0)))
        return found

    async def image_remove(self, image_id: str) -> bool:
        """``podman image rm``; False when a container still uses it (nothing removed)."""
        rc, _, err = await self._run("image", "rm", image_id, check=False, timeout=120)
        if rc != 0:
            log.info("image %s not removed: %s", image_id[:12], err.strip().splitlines()[-1:] or "")
        return rc == 0

    async def image_inspect(self, image: str) -> dict[str, Any] | None:
        rc, out, _ = await self._run("image", "inspect", image, check=False, timeout=60)
        if rc != 0:
            return None
        data = json.loads(out or "[]")
        return data[0] if data else None

    # -- containers -------------------------------------------------------------
    async def run(self, spec: ContainerSpec) -> str:
        """``podman run -d``; returns the container id."""
        state_subdir(self.settings.state_dir, "runtime", "tmp")
        fd, env_file = tempfile.mkstemp(dir=self._tmp, prefix="env-", suffix=".list")
        try:
            with os.fdopen(fd, "w") as fh:
                for k, v in spec.env.items():
                    fh.write(f"{k}={_one_line(v)}\n")
            args = ["run", "--detach", "--name", spec.name, "--pull", "never",
                    "--env-file", env_file]
            for k, v in spec.labels.items():
                args += ["--label", f"{k}={v}"]
            for addr, hport, cport in spec.publish:
                args += ["--publish", f"{addr}:{hport}:{cport}" if addr not in ("", "0.0.0.0") else f"{hport}:{cport}"]
            args += reserved_ports(c for _, _, c in spec.publish)
            if spec.working_dir:
                args += ["--workdir", spec.working_dir]
            if spec.user is not None:
                args += ["--user", spec.user]
            if spec.cpus:
                args += ["--cpus", f"{spec.cpus:g}"]
            if spec.memory:
                args += ["--memory", spec.memory]
            if spec.pids_limit:
                args += ["--pids-limit", str(spec.pids_limit)]
            if not spec.tls_verify:
                args.append("--tls-verify=false")
            args += spec.extra
            args += ["--entrypoint", json.dumps(spec.argv[:1]), spec.image, *spec.argv[1:]]
            _, out, _ = await self._run(*args, timeout=300, finish=True)
            return out.strip().splitlines()[-1] if out.strip() else ""
        finally:
            Path(env_file).unlink(missing_ok=True)

    async def remove(self, *names: str) -> None:
        if names:
            await self._run("rm", "--force", "--ignore", "--time", "0", *names, timeout=120)

    async def pause(self, name: str) -> None:
        rc, out, err = await self._run("pause", name, check=False, timeout=60)
        if rc == 0:
            return
        if "cgroup" not in err:
            raise BackendError(f"`podman pause {name}` failed (exit {rc}): {err.strip() or out.strip()}")
        # rootless podman on cgroup v1 (or without a delegated freezer): the container has
        # no cgroup to freeze, so every process of it is stopped instead (SIGSTOP cannot
        # be caught or ignored)
        await self._signal_all(name, "STOP")

    async def unpause(self, name: str) -> None:
        rc, _, _ = await self._run("unpause", name, check=False, timeout=60)
        if rc != 0:  # paused by signal (see pause); SIGCONT to a running process is harmless
            await self._signal_all(name, "CONT")

    async def _signal_all(self, name: str, sig: str) -> None:
        """Send ``sig`` to every process of container ``name``, from inside podman's user
        namespace (where processes of the container's other uids can be signalled too).
        STOP repeats until no new process appears: one may fork while the others stop."""
        seen: set[str] = set()
        for _ in range(10):
            _, out, _ = await self._run("top", name, "hpid", timeout=60)
            pids = {p for p in out.split()[1:] if p.isdigit()}
            todo = sorted(pids - seen) if sig == "STOP" else sorted(pids)
            if not todo:
                return
            await self._run("unshare", "kill", f"-{sig}", *todo, timeout=60)
            if sig != "STOP":
                return
            seen |= pids
        raise BackendError(f"container {name} kept starting processes while being paused")

    async def list(self, labels: Mapping[str, str]) -> list[ContainerInfo]:
        args = ["ps", "--all", "--format", "json"]
        for k, v in labels.items():
            args += ["--filter", f"label={k}={v}" if v else f"label={k}"]
        _, out, _ = await self._run(*args, timeout=60)
        found = []
        for c in json.loads(out or "[]") or []:
            names = c.get("Names") or [""]
            found.append(ContainerInfo(
                id=c.get("Id", ""), name=names[0], state=(c.get("State") or "").lower(),
                exit_code=c.get("ExitCode") if c.get("Exited") else None, labels=c.get("Labels") or {}))
        return found

    async def inspect(self, name: str) -> ContainerInfo | None:
        rc, out, _ = await self._run("container", "inspect", name, check=False, timeout=60)
        if rc != 0:
            return None
        data = (json.loads(out or "[]") or [None])[0]
        if not data:
            return None
        st = data.get("State") or {}
        status = (st.get("Status") or "").lower()
        return ContainerInfo(
            id=data.get("Id", ""), name=data.get("Name", name), state=status,
            exit_code=st.get("ExitCode") if status in ("exited", "stopped") else None,
            labels=(data.get("Config") or {}).get("Labels") or {},
            oom_killed=bool(st.get("OOMKilled")), error=st.get("Error") or "")

    async def logs(self, name: str, tail: int = 50) -> str:
        rc, out, _ = await self._run("logs", "--tail", str(tail), name, check=False, merge=True, timeout=60)
        return out if rc == 0 else ""

    async def cpu_times(self, names: Sequence[str]) -> dict[str, float]:
        """Seconds of CPU each running container has used (for idle detection)."""
        if not names:
            return {}
        rc, out, _ = await self._run("stats", "--no-stream", "--no-reset", "--format", "json", *names,
                                     check=False, timeout=60)
        if rc != 0:
            return {}
        times = {}
        for s in json.loads(out or "[]") or []:
            times[s.get("name", "")] = _duration(s.get("cpu_time", ""))
        return times


def _kill(proc: asyncio.subprocess.Process) -> None:
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def _one_line(value: str) -> str:
    # an env file holds one variable per line: newlines cannot travel through it
    return value.replace("\r", " ").replace("\n", " ")


_UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(text: str) -> float:
    """Parse Go durations like ``1m2.5s`` / ``39.4ms``."""
    import re

    total = 0.0
    for num, unit in re.findall(r"([0-9.]+)(ns|µs|us|ms|s|m|h)", text or ""):
        total += float(num) * _UNITS[unit]
    return total
