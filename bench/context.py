"""What a benchmark run owns: a private work directory, services, fixtures, cleanup.

``Bench`` creates things lazily (the first section that needs registry A starts it)
and registers every one of them on an ``ExitStack``: registries, Redis, Celery
workers, the runtime and lookup servers, container storage (podman/buildah under a
private ``state_dir``), and the work directory itself. ``close()`` undoes all of it,
also after Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefarm import oci
from imagefarm.host.containers import run
from imagefarm.derive import AppendPayload
from imagefarm.derive.append import payload_home
from imagefarm.derive.blobs import BlobPlacer
from imagefarm.names.reference import Reference, parse
from imagefarm.registry import RegistryClient
from imagefarm.settings import Settings
from imagefarm.host.samples import R2E_ENV, R2E_REPOS, FixtureFactory, FixtureImage, commit_for
from imagefarm.host.services import Redis, Registry, free_port

REPO = Path(__file__).resolve().parent.parent
Log = Callable[[str], None]


# -- plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Sizes of one run; ``--quick`` and full differ only here."""

    quick: bool
    real_bases: int           #: realistic bases (shared OS layer + a unique layer each)
    real_unique_mib: int      #: random MiB per base (the layer is ~2x: the git objects hold it again)
    naive_bases: int          #: how many of them the naive path builds (budget permitting)
    naive_budget_s: float     #: stop the naive loop (after >= 1 image) once this is spent
    fast_rounds: int          #: warm fast-path rounds over the realistic set
    small_bases: int          #: small bases for scale/farm/lookup
    farm_full_bases: int      #: the farm at full size: R2E-Gym-Subset's 4,578 bases
    farm_full_workers: int    #: Celery worker processes for the full-size run
    threads: tuple[int, ...]
    farm_workers: tuple[int, ...]
    local_workers: int
    copy_bases: int
    warm_starts: int
    cold_starts: int
    cold_payload_starts: int
    direct_starts: int
    concurrent_starts: int
    lookup_seconds: float
    lookup_concurrency: int

    @classmethod
    def make(cls, quick: bool, **over: Any) -> Plan:
        if quick:
            base: dict[str, Any] = {
                "real_bases": 2, "real_unique_mib": 20, "naive_bases": 1, "naive_budget_s": 150,
                "fast_rounds": 5, "small_bases": 40, "farm_full_bases": 300, "farm_full_workers": 4, "threads": (1, 4, 8), "farm_workers": (1, 2, 4),
                "local_workers": 8, "copy_bases": 2, "warm_starts": 3, "cold_starts": 1,
                "cold_payload_starts": 0, "direct_starts": 2, "concurrent_starts": 0,
                "lookup_seconds": 3.0, "lookup_concurrency": 16}
        else:
            base = {
                "real_bases": 6, "real_unique_mib": 100, "naive_bases": 6, "naive_budget_s": 420,
                "fast_rounds": 10, "small_bases": 200, "farm_full_bases": 4578, "farm_full_workers": 4, "threads": (1, 4, 8), "farm_workers": (1, 2, 4),
                "local_workers": 8, "copy_bases": 6, "warm_starts": 20, "cold_starts": 2,
                "cold_payload_starts": 2, "direct_starts": 6, "concurrent_starts": 8,
                "lookup_seconds": 10.0, "lookup_concurrency": 32}
        base.update({k: v for k, v in over.items() if v is not None})
        base["naive_bases"] = min(base["naive_bases"], base["real_bases"])
        base["copy_bases"] = min(base["copy_bases"], base["real_bases"])
        return cls(quick=quick, **base)


# -- registry access log ----------------------------------------------------------------------
class LoggedRegistry(Registry):
    """docker-registry with its access log on (Apache combined format, in registry.log)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw, access_log=True)

    def blob_size(self, digest: str) -> int:
        hexd = digest.split(":", 1)[1]
        p = self.workdir / "data/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
        try:
            return p.stat().st_size
        except OSError:
            return 0

    def storage_bytes(self) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self.workdir / "data"):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, f)).st_size
        return total

    def traffic(self, mark: int) -> dict[str, Any]:
        """What the access log says happened since ``mark``.

        requests: every logged request; pulled: response bytes of GET .../blobs/<digest>;
        pushed: sizes of the blobs whose upload was completed (PUT ...?digest=) -- the
        combined log has no request-body size, the stored blob has it; mounts: POST
        ...?mount= answered 201.
        """
        time.sleep(0.05)  # the registry writes the line right after the response
        out = {"requests": 0, "by_method": {}, "pulled_bytes": 0, "pushed_bytes": 0, "pushed_blobs": 0,
               "mounts": 0, "manifest_puts": 0, "agents": {}, "pushed": {}}
        for a in self.accesses(mark):
            method, path, status, size, agent = a.method, a.path, str(a.status), a.size, a.agent
            out["requests"] += 1
            out["by_method"][method] = out["by_method"].get(method, 0) + 1
            short = agent.split("/")[0] or "-"
            out["agents"][short] = out["agents"].get(short, 0) + 1
            if method == "GET" and "/blobs/sha256:" in path and status == "200" and size is not None:
                out["pulled_bytes"] += size
            elif method == "PUT" and "/blobs/uploads/" in path and status == "201":
                dm = re.search(r"digest=(sha256(?::|%3A)[0-9a-f]{64})", path)
                if dm:
                    digest = dm.group(1).replace("%3A", ":")
                    blob = self.blob_size(digest)
                    out["pushed_blobs"] += 1
                    out["pushed_bytes"] += blob
                    out["pushed"][digest] = blob
            elif method == "POST" and "mount=" in path and status == "201":
                out["mounts"] += 1
            elif method == "PUT" and "/manifests/" in path:
                out["manifest_puts"] += 1
        return out


# -- the run --------------------------------------------------------------------------------
class Bench:
    def __init__(self, plan: Plan, log: Log, keep_logs: str | None = None) -> None:
        self.plan = plan
        self.keep_logs = keep_logs
        self.log = log
        self.work = Path(tempfile.mkdtemp(prefix="imagefarm-bench-"))
        self.state_dir = self.work / "state"
        self.stack = contextlib.ExitStack()
        self.stack.callback(self._remove_work)
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self.stack.callback(self._stop_procs)
        self._storage_used = False
        self._lock = threading.Lock()
        self._registries: dict[str, LoggedRegistry] = {}
        self._payload: AppendPayload | None = None
        self._payload_homes: dict[str, list[str]] = {}
        self._factory: FixtureFactory | None = None
        self._real: list[FixtureImage] | None = None
        self._small: list[str] | None = None
        self._redis: Redis | None = None
        self.notes: dict[str, Any] = {}   #: facts one section leaves for another (e.g. naive build time)

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        self.stack.close()

    def settings(self, **over: Any) -> Settings:
        return Settings.load(state_dir=self.state_dir, **over)

    def _remove_work(self) -> None:
        if self.keep_logs:
            dest = Path(self.keep_logs)
            dest.mkdir(parents=True, exist_ok=True)
            for f in list(self.work.glob("*.log")) + list(self.work.glob("registry-*/registry.log")):
                with contextlib.suppress(OSError):
                    shutil.copy(f, dest / (f.parent.name + "-" + f.name if f.parent != self.work else f.name))
            self.log(f"logs kept in {dest}")
        self.log(f"cleanup: removing {self.work}")
        _umount_under(self.work)
        shutil.rmtree(self.work, ignore_errors=True)

    def spawn(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
              log_name: str | None = None) -> subprocess.Popen:
        """A child in its own session (Ctrl-C reaches us, not it); stopped by ``close``."""
        with open(self.work / (log_name or f"{name}.log"), "ab") as logf:
            proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                    start_new_session=True, cwd=REPO)
        self._procs.append((name, proc))
        return proc

    def stop_proc(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Stop a child we started, and its process group (it leads its own session)."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        # children that outlived their leader (prefork pool) share its process group id
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self._procs = [(n, p) for n, p in self._procs if p is not proc]

    def _stop_procs(self) -> None:
        for _name, proc in reversed(list(self._procs)):
            self.stop_proc(proc)

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join((self.work / name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- container storage ------------------------------------------------------------------
    def containers(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        """podman/buildah/skopeo with the project's config and this run's private storage."""
        if not self._storage_used:
            self._storage_used = True
            self.stack.callback(self._clean_storage)
        return run(self.settings(), argv, **kw)

    def _clean_storage(self) -> None:
        self.log("cleanup: removing containers and images from the run's container storage")
        s = self.settings()
        for argv in (["podman", "rm", "--all", "--force", "--time", "0"], ["buildah", "rm", "--all"],
                     ["podman", "rmi", "--all", "--force"], ["buildah", "rmi", "--all", "--force"]):
            with contextlib.suppress(Exception):
                run(s, argv, check=False, timeout=300)
        _umount_under(self.state_dir)

    # -- services -----------------------------------------------------------------------------
    def registry(self, name: str = "a") -> LoggedRegistry:
        with self._lock:
            reg = self._registries.get(name)
            if reg is None:
                reg = LoggedRegistry(workdir=self.work / f"registry-{name}")
                reg.start()
                self.stack.callback(reg.stop)
                self._registries[name] = reg
                self.log(f"registry {name}: {reg.url}")
            return reg

    def redis(self) -> Redis:
        if self._redis is None:
            self._redis = Redis(workdir=self.work / "redis")
            self._redis.start()
            self.stack.callback(self._redis.stop)
            self.log(f"redis: {self._redis.url}")
        return self._redis

    # -- payload --------------------------------------------------------------------------------
    @property
    def payload(self) -> AppendPayload:
        if self._payload is None:
            from imagefarm.payload import build_payload
            from imagefarm.payload.recipe import recipe_for

            s = self.settings()
            recipe = recipe_for(s)
            t0 = time.monotonic()
            built = build_payload(s, recipe, log=self.log)
            self._payload = AppendPayload.of(built, recipe)
            self.notes["payload"] = {"digest": built.layer.digest, "size": built.layer.size,
                                     "uncompressed": built.uncompressed_size,
                                     "agent_server_version": built.agent_server_version,
                                     "recipe": recipe.name, "seconds_to_get": round(time.monotonic() - t0, 1)}
            self.log(f"payload {built.layer.digest[:19]}: {built.layer.size / 1e6:.0f} MB gz, "
                     f"{built.uncompressed_size / 1e6:.0f} MB unpacked")
        return self._payload

    def check_recipe_stable(self) -> None:
        """Fail clearly if a fresh process now computes another recipe digest than this
        run's payload has (the recipe or its code was edited while the bench ran): the
        services started from here on would look for images nobody derived."""
        code = ("from imagefarm.settings import Settings; from imagefarm.payload.recipe import recipe_for; "
                "print(recipe_for(Settings.load()).digest)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                             timeout=120, check=False)
        now = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
        if now and now != self.payload.recipe_digest:
            raise RuntimeError(
                f"the recipe digest changed while the bench ran ({self.payload.recipe_digest[:19]} at the start, "
                f"{now[:19]} in a fresh process now): the recipe or imagefarm's code was edited; run the bench "
                "again on a tree nobody is changing")

    def payload_context(self) -> tuple[Path, float]:
        """The payload layer unpacked once: the naive path's COPY source (and its seconds)."""
        ctx = self.work / "payload-context"
        if (ctx / ".done").exists():
            return ctx, 0.0
        ctx.mkdir(exist_ok=True)
        t0 = time.monotonic()
        subprocess.run(["tar", "-xzf", str(self.payload.layer.path), "-C", str(ctx)], check=True)
        (ctx / ".done").touch()
        return ctx, time.monotonic() - t0

    def seed_payload(self, reg: LoggedRegistry, prefix: str) -> None:
        """Make the payload blob present in ``<prefix>/imagefarm-payload`` (mounted from a
        repository of the same registry that has it, uploaded only the first time): the
        steady state of a registry that already serves this agent-server version."""
        home = payload_home(f"{reg.host}/{prefix}")
        digest = self.payload.layer.digest
        with RegistryClient(self.settings()) as c:
            target = Reference(reg.host, home)
            if c.blob_exists(target, digest):
                return
            for other in self._payload_homes.get(reg.host, []) + [payload_home(f"{reg.host}/prebuilt")]:
                if c.blob_exists(Reference(reg.host, other), digest):
                    mounted, _ = c.mount_blob(target, digest, other)
                    if mounted:
                        break
            else:
                c.upload_blob(target, digest, self.payload.layer.path, size=self.payload.layer.size)
        self._payload_homes.setdefault(reg.host, []).append(home)

    # -- fixtures --------------------------------------------------------------------------------
    @property
    def factory(self) -> FixtureFactory:
        if self._factory is None:
            self._factory = FixtureFactory(self.settings(), self.registry().host, log=self.log)
            self.stack.callback(self._factory.close)
        return self._factory

    def realistic_set(self) -> list[FixtureImage]:
        """``real_bases`` r2e-shaped bases in registry A: shared OS + venv layers, and a
        unique /testbed layer of ``real_unique_mib`` random MiB each (cached layers)."""
        if self._real is None:
            n, mib = self.plan.real_bases, self.plan.real_unique_mib
            t0 = time.monotonic()
            out = []
            for i in range(n):
                repo = R2E_REPOS[i % len(R2E_REPOS)]
                self.log(f"fixture base {i + 1}/{n}: {repo} with {mib} MiB unique (cached after the first run)")
                out.append(self.factory.r2e_base(repo, commit_for(f"bench-real-{mib}-{i}"), unique_bytes=mib << 20))
            self._real = out
            sizes = self.image_sizes([f.ref for f in out])
            self.notes["real_set"] = {"n": n, "unique_mib": mib, "seconds": round(time.monotonic() - t0, 1),
                                      **sizes}
        return self._real

    def image_sizes(self, refs: list[str]) -> dict[str, Any]:
        """Per image compressed size, and the distinct blobs across the set."""
        per, blobs = [], {}
        with RegistryClient(self.settings()) as c:
            for ref in refs:
                m = c.resolve(parse(ref)).manifest
                descs = [m.config, *m.layers]
                per.append(sum(d.size for d in descs))
                for d in descs:
                    blobs[d.digest] = d.size
        return {"image_bytes": per, "sum_image_bytes": sum(per), "unique_bytes": sum(blobs.values()),
                "distinct_blobs": len(blobs)}

    def small_set(self) -> list[str]:
        """``small_bases`` r2e-shaped bases in registry A (the unique layer is a small
        repository checkout), pushed with the project's registry client in parallel."""
        return self.base_set(self.plan.small_bases)

    def base_set(self, n: int) -> list[str]:
        """The first ``n`` of the small bases (a larger set contains every smaller one)."""
        have = self._small or []
        if len(have) >= n:
            return have[:n]
        reg = self.registry()
        ff = self.factory
        t0 = time.monotonic()
        self.log(f"pushing {n} small fixture bases to registry a (testbed layers cached after the first run)")
        os_layer, venv_layer = ff.os_layer(), ff.venv_layer()
        specs = []
        for i in range(n):
            repo = R2E_REPOS[i % len(R2E_REPOS)]
            specs.append((repo, commit_for(f"bench-small-{i}")))
        with ThreadPoolExecutor(4) as pool:  # git + gzip of small trees; cached per commit
            layers = list(pool.map(lambda rc: ff.testbed_layer(rc[0], rc[1], 0), specs))
        with RegistryClient(self.settings()) as c:
            placer = BlobPlacer(c)

            def push(i: int) -> str:
                repo, commit = specs[i]
                ls = [os_layer, venv_layer, layers[i]]
                cfg = oci.canonical_json(oci.image_config(
                    ls, env=list(R2E_ENV), cmd=["/bin/bash"], working_dir="/testbed",
                    history=[{"created": oci.EPOCH_ISO, "created_by": s} for s in
                             ("debootstrap bookworm", "python3 -m venv /testbed/.venv",
                              f"COPY {repo}@{commit} /testbed")]))
                target = parse(f"{reg.host}/{repo}:{commit}")
                for layer in ls:
                    placer.ensure(target, layer.descriptor, local=layer.path, home="bench-seed/layers")
                c.upload_blob(target, oci.sha256_digest(cfg), cfg)
                c.put_manifest(target, oci.canonical_json(oci.image_manifest(cfg, ls)), oci.OCI_MANIFEST)
                return str(target)

            refs = [push(0)]  # the shared layers go up once, then every other base mounts them
            with ThreadPoolExecutor(8) as pool:
                refs += list(pool.map(push, range(1, n)))
        self._small = refs
        self.notes[f"small_set_{n}"] = {"n": n, "seconds": round(time.monotonic() - t0, 1)}
        self.log(f"{n} small bases ready in {time.monotonic() - t0:.1f}s")
        return refs

    def dataset_file(self, refs: list[str], name: str) -> Path:
        p = self.work / name
        p.write_text("".join(r + "\n" for r in refs))
        return p


def _umount_under(root: Path) -> None:
    """Lazy-unmount anything still mounted below ``root`` (overlay leftovers)."""
    root_s = str(root.resolve()) if root.exists() else str(root)
    try:
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    except OSError:
        return
    for mp in sorted((m.replace("\\040", " ") for m in mounts if m.startswith(root_s)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True, check=False)


def python() -> str:
    return sys.executable


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str)


__all__ = ["Bench", "LoggedRegistry", "Plan", "dump", "free_port", "python"]
