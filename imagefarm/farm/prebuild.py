"""The batch: every base of a dataset -> a derived, verified agent-server image.

One driver, two executors with the same units of work (``imagefarm.farm.jobs``): a local
thread pool (the embedded default, no Redis) and Celery on Redis (CPU-node workers).
Derives are submitted first; each finished derive that is chosen for verification
queues a verify on its own queue. Progress is shown live and saved under the state
directory, so ``imagefarm status`` can report a running or finished batch. Re-running
redoes nothing finished: a tag that holds the same derive is "done", a recorded
verification is "verified".

Publishing: an image chosen for verification is pushed by digest only; its tag (what
lookups and runtimes find) is put when it has booted and answered. Images left out of
the sample (``--verify N`` / ``none``) are tagged at once: that is the caller's choice.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from . import jobs
from .catalog import Catalog, load
from imagefarm.errors import ConfigError
from .lockfile import Entry, Lockfile
from imagefarm.host.proc import pid_alive
from imagefarm.registry.ratelimit import RateLimited
from imagefarm.settings import Settings
from imagefarm.host.statedir import state_subdir


@dataclass
class Outcome:
    base: str
    ok: bool = False
    skipped: bool = False
    image: str = ""
    digest: str = ""
    base_digest: str = ""
    verified: bool | None = None   #: None: not checked in this batch
    verify_skipped: bool = False
    error: str = ""
    stage: str = "derive"


@dataclass
class BatchState:
    batch_id: str
    dataset: str
    to: str
    recipe: str
    executor: str
    total: int
    pid: int = field(default_factory=os.getpid)
    started: float = field(default_factory=time.time)
    finished: float | None = None
    status: str = "running"        #: running, finished, interrupted, failed
    derived: int = 0
    skipped: int = 0
    failed: int = 0
    verified: int = 0
    verify_failed: int = 0
    bad_rows: int = 0
    resubmitted: int = 0           #: tasks the driver asked for again after a stall (last resort)
    redelivered: int = 0           #: tasks the broker delivered more than once (a worker was lost)
    extra_deliveries: int = 0      #: deliveries beyond the first (and beyond a task's own retries)
    failures: list[dict[str, str]] = field(default_factory=list)
    lockfile: str = ""

    @property
    def done(self) -> int:
        return self.derived + self.skipped + self.failed


def batches_dir(settings: Settings) -> Path:
    return Path(settings.state_dir) / "batches"


def save_state(settings: Settings, state: BatchState) -> None:
    d = batches_dir(settings)
    state_subdir(d.parent, d.name)
    tmp = d / f".{state.batch_id}.tmp"
    tmp.write_text(json.dumps(asdict(state), indent=1))
    tmp.replace(d / f"{state.batch_id}.json")
    (d / "latest").write_text(state.batch_id)


def load_state(settings: Settings, batch_id: str | None = None) -> BatchState | None:
    d = batches_dir(settings)
    try:
        batch_id = batch_id or (d / "latest").read_text().strip()
        state = BatchState(**json.loads((d / f"{batch_id}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if state.status == "running" and not pid_alive(state.pid):
        state.status = "interrupted"
    return state


# -- executors -------------------------------------------------------------------------
class Executor(Protocol):
    name: str

    def derive(self, base: str, publish: bool) -> Any: ...
    def relayer(self, bases: list[str], publish: list[str]) -> Any: ...
    def verify(self, image: str, digest: str) -> Any: ...
    def wait(self, handles: set[Any], timeout: float) -> Iterator[tuple[Any, dict[str, Any]]]: ...
    def close(self) -> None: ...


class LocalExecutor:
    """Threads on this machine: derive is network-bound, verify starts containers."""

    name = "local"

    def __init__(self, settings: Settings, layer: dict[str, Any] | None, workers: int = 8,
                 verify_workers: int = 2, verify_timeout: float = 120.0) -> None:
        self.settings, self.layer, self.verify_timeout = settings, layer, verify_timeout
        self._derive_pool = ThreadPoolExecutor(workers, thread_name_prefix="derive")
        self._verify_pool = ThreadPoolExecutor(verify_workers, thread_name_prefix="verify")

    def derive(self, base: str, publish: bool) -> Future:
        return _deferring(self._derive_pool, lambda: _retrying(lambda: jobs.derive_base(
            self.settings, base, self.settings.recipe, self.layer, publish), base))

    def relayer(self, bases: list[str], publish: list[str]) -> Future:
        return _deferring(self._derive_pool, lambda: _retrying(lambda: jobs.relayer_group(
            self.settings, bases, self.settings.recipe, self.layer, publish), bases[0]))

    def verify(self, image: str, digest: str) -> Future:
        return _deferring(self._verify_pool, lambda: _retrying(lambda: jobs.verify_image(
            self.settings, image, digest, self.verify_timeout), image))

    def wait(self, handles: set[Future], timeout: float) -> Iterator[tuple[Future, dict[str, Any]]]:
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        for f in done:
            yield f, f.result()

    def close(self) -> None:
        self._derive_pool.shutdown(wait=False, cancel_futures=True)
        self._verify_pool.shutdown(wait=False, cancel_futures=True)


def _deferring(pool: ThreadPoolExecutor, fn: Callable[[], dict[str, Any]]) -> Future:
    """Run ``fn`` on ``pool``; when its registry's pull budget is spent (``RateLimited``)
    set it aside, holding no thread, and queue it again when the gate opens: the pool
    meanwhile derives bases from other registries, and nothing fails for a rate limit."""
    outer: Future = Future()

    def attempt() -> None:
        try:
            outer.set_result(fn())
        except RateLimited as exc:
            timer = threading.Timer(max(0.0, exc.until - time.time()), _resubmit, (pool, attempt, outer))
            timer.daemon = True
            timer.start()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter
            outer.set_exception(exc)

    pool.submit(attempt)
    return outer


def _resubmit(pool: ThreadPoolExecutor, attempt: Callable[[], None], outer: Future) -> None:
    try:
        pool.submit(attempt)
    except RuntimeError:  # the batch ended (interrupted) while this base waited
        outer.cancel()


def _retrying(fn: Callable[[], dict[str, Any]], what: str, attempts: int = 6) -> dict[str, Any]:
    """The local pool's retry policy for transient errors (Celery has its own); a rate
    limit is no error here: ``_deferring`` waits it out."""
    from imagefarm.errors import ImagefarmError

    for attempt in range(attempts):
        try:
            return fn()
        except RateLimited:
            raise
        except ImagefarmError as exc:
            if not exc.transient or attempt == attempts - 1:
                return {"ok": False, "base": what, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a worker thread must report, not die
            return {"ok": False, "base": what, "error": f"{type(exc).__name__}: {exc}"}
        time.sleep(min(30.0, 0.5 * 2 ** attempt) * (0.5 + random.random()))
    return {"ok": False, "base": what, "error": "retries exhausted"}


class CeleryExecutor:
    """Tasks on the Redis broker; workers on CPU nodes run them.

    Results are read in sweeps, one MGET of the result keys of everything pending (in
    chunks), not one request per task: the driver's cost no longer grows with the
    batch times the poll rate. Redis being away is waited out sweep by sweep.
    """

    name = "celery"
    CHUNK = 2000

    def __init__(self, settings: Settings, layer: dict[str, Any] | None, verify_timeout: float = 120.0) -> None:
        from imagefarm.worker.app import app

        app.conf.broker_url = app.conf.result_backend = settings.broker_url
        self.settings, self.layer, self.verify_timeout, self.app = settings, layer, verify_timeout, app
        self.submitted: list[str] = []

    def derive(self, base: str, publish: bool):
        from imagefarm.worker import tasks

        return self._sent(tasks.derive.apply_async(
            args=[base, self.settings.to, self.settings.recipe, self.layer, publish], kwargs=self._version))

    def relayer(self, bases: list[str], publish: list[str]):
        from imagefarm.worker import tasks

        return self._sent(tasks.relayer.apply_async(
            args=[bases, self.settings.to, self.settings.recipe, self.layer, publish], kwargs=self._version))

    def verify(self, image: str, digest: str):
        from imagefarm.worker import tasks

        return self._sent(tasks.verify.apply_async(
            args=[image, digest, self.settings.to, self.settings.recipe, self.verify_timeout], kwargs=self._version))

    @property
    def _version(self) -> dict[str, str]:
        """The recipe's version travels with each task (a worker's settings lack the flag)."""
        v = self.settings.agent_server_version
        return {"version": v} if v else {}

    def _sent(self, handle):
        self.submitted.append(handle.id)
        return handle

    def _sweep(self, handles: list[Any]) -> list[tuple[Any, dict[str, Any]]]:
        from celery import states

        backend = self.app.backend
        ready = []
        for i in range(0, len(handles), self.CHUNK):
            chunk = handles[i:i + self.CHUNK]
            values = backend.client.mget([backend.get_key_for_task(h.id) for h in chunk])
            for h, raw in zip(chunk, values):
                if raw is not None:
                    meta = backend.decode_result(raw)
                    if meta["status"] in states.READY_STATES:
                        ready.append((h, meta))
        return ready

    def wait(self, handles: set[Any], timeout: float):
        import redis
        from celery import states

        deadline = time.monotonic() + timeout
        order = list(handles)
        while True:
            try:
                ready = self._sweep(order)
            except (redis.ConnectionError, redis.TimeoutError):
                ready = []  # Redis is restarting: the results wait there (appendonly)
            if ready or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for h, meta in ready:
            if meta["status"] == states.SUCCESS:
                yield h, meta["result"]
            else:
                yield h, {"ok": False, "error": f"task failed: {meta.get('result')!r}"}
        if ready:
            try:
                self.app.backend.client.delete(*[self.app.backend.get_key_for_task(h.id) for h, _ in ready])
            except (redis.ConnectionError, redis.TimeoutError):
                pass  # results expire on their own (result_expires)

    def unconsumed(self, queues: set[str]) -> list[str] | None:
        """Those of ``queues`` no live worker consumes (asked with a 1 s broadcast);
        None when the broker itself does not answer."""
        try:
            replies = self.app.control.inspect(timeout=1.0).active_queues() or {}
        except Exception:  # noqa: BLE001 - a broker that is away: no claim either way
            return None
        served = {q["name"] for qs in replies.values() for q in qs or []}
        return sorted(queues - served)

    def start_hint(self, queue: str) -> str:
        return f"imagefarm worker --queues {queue} --broker-url {_redacted(self.settings.broker_url)}"

    def last_activity(self, handles) -> float | None:
        """The latest sign of life among ``handles``' tasks (epoch), from their delivery
        records: a delivery, or the time a retry's or a pause's countdown ends (in the
        future while it waits). None when the broker does not answer."""
        from imagefarm.worker.tasks import task_key

        client = self.app.backend.client
        latest = 0.0
        try:
            ids = [h.id for h in handles]
            for i in range(0, len(ids), self.CHUNK):
                pipe = client.pipeline(transaction=False)
                for tid in ids[i:i + self.CHUNK]:
                    pipe.hmget(task_key(tid), "seen", "eta")
                for got in pipe.execute():
                    latest = max([latest, *(float(x) for x in got if x)])
        except Exception:  # noqa: BLE001 - a broker that is away: no claim either way
            return None
        return latest

    def deliveries(self) -> dict[str, int]:
        """From the tasks' delivery records: tasks the broker delivered more than once
        (beyond their own retries and rate-limit pauses), and how many extra deliveries."""
        from imagefarm.worker.tasks import task_key

        client = self.app.backend.client
        extra = redelivered = 0
        try:
            for i in range(0, len(self.submitted), self.CHUNK):
                pipe = client.pipeline(transaction=False)
                for tid in self.submitted[i:i + self.CHUNK]:
                    pipe.hmget(task_key(tid), "deliveries", "retries", "paused")
                for got in pipe.execute():
                    n, retries, paused = (int(x or 0) for x in got)
                    if n > 1 + retries + paused:
                        redelivered += 1
                        extra += n - 1 - retries - paused
        except Exception:  # noqa: BLE001 - bookkeeping must not fail a finished batch
            return {}
        return {"redelivered_tasks": redelivered, "extra_deliveries": extra}

    def close(self) -> None:
        pass


def _redacted(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(url)
    if u.password:
        u = u._replace(netloc=f"{u.username or ''}:***@{u.hostname}" + (f":{u.port}" if u.port else ""))
    return urlunsplit(u)


# -- the driver ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchResult:
    state: BatchState
    outcomes: dict[str, Outcome]
    catalog: Catalog
    lockfile: Lockfile | None


def choose_verify(bases: list[str], verify: str) -> set[str]:
    """``all``, ``none`` or a number N: a deterministic sample of N bases."""
    if verify == "all":
        return set(bases)
    if verify == "none":
        return set()
    try:
        n = int(verify)
    except ValueError:
        raise ConfigError(f"--verify must be all, none or a number, not {verify!r}") from None
    return set(sorted(bases, key=lambda b: hash_of(b))[:max(0, n)])


#: the most bases one re-layering task takes (its trees are held in memory)
RELAYER_GROUP_MAX = 32


def relayer_groups(bases: list[str]) -> list[list[str]]:
    """The bases of one repository (registry and path), in dataset order, in groups of
    at most ``RELAYER_GROUP_MAX``: what ``--relayer`` re-layers together."""
    from imagefarm.names.reference import parse

    by_repo: dict[str, list[str]] = {}
    for b in bases:
        ref = parse(b)
        by_repo.setdefault(f"{ref.registry}/{ref.repository}", []).append(b)
    return [bs[i:i + RELAYER_GROUP_MAX] for bs in by_repo.values() for i in range(0, len(bs), RELAYER_GROUP_MAX)]


def _queue(stage: str) -> str:
    return "derive" if stage == "relayer" else stage


def hash_of(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def run_batch(settings: Settings, dataset: str, *, executor: str = "local", limit: int | None = None,
              verify: str = "all", lockfile: Path | None = None, workers: int = 8,
              verify_timeout: float = 120.0, on_progress: Callable[[BatchState], None] | None = None,
              log: Callable[[str], None] = lambda m: None, relayer: bool = False) -> BatchResult:
    """``relayer``: the bases of one repository are re-layered together (``derive.relayer``,
    one task per group) instead of derived one by one; a repository with one base is
    derived as usual."""
    from imagefarm.payload.recipe import recipe_for
    from imagefarm.payload.remote import locate, push
    from imagefarm.registry import RegistryClient

    cat = load(dataset).limited(limit)
    for bad in cat.bad_rows[:20]:
        log(f"skipped {bad}")
    if len(cat.bad_rows) > 20:
        log(f"... and {len(cat.bad_rows) - 20} more bad rows")
    if not cat.bases:  # fail before the (possibly minutes-long) payload build
        from imagefarm.errors import DatasetError

        first = f"; first: {cat.bad_rows[0]}" if cat.bad_rows else ""
        raise DatasetError(f"dataset {dataset} names no usable image ({len(cat.bad_rows)} bad rows{first})")
    recipe = recipe_for(settings)
    with RegistryClient(settings) as client:
        payload = locate(settings, recipe, client, log=log)
        # published in the target registry first: a worker without the blob mounts it
        push(client, payload, settings.to)
    layer = payload.layer.to_json()
    bases = [str(b) for b in cat.bases]
    state = BatchState(uuid.uuid4().hex[:12], dataset, settings.to, recipe.name, executor, len(bases),
                       bad_rows=len(cat.bad_rows), lockfile=str(lockfile or ""))
    save_state(settings, state)
    ex: Executor = (LocalExecutor(settings, layer, workers, verify_timeout=verify_timeout) if executor == "local"
                    else CeleryExecutor(settings, layer, verify_timeout))
    to_verify = choose_verify(bases, verify)
    outcomes = {b: Outcome(b) for b in bases}
    pending: dict[Any, tuple[str, str]] = {}
    groups = {g[0]: g for g in relayer_groups(bases) if len(g) > 1} if relayer else {}
    interrupted = False
    old_handler = signal.getsignal(signal.SIGTERM)

    def _term(*_: Any) -> None:
        raise KeyboardInterrupt

    if threading_main():
        signal.signal(signal.SIGTERM, _term)
    def submit(stage: str, base: str) -> None:
        o = outcomes[base]
        if stage == "relayer":  # ``base`` names the group by its first base
            handle = ex.relayer(groups[base], [b for b in groups[base] if b not in to_verify])
        else:
            handle = (ex.derive(base, base not in to_verify) if stage == "derive"  # verify first, then tag
                      else ex.verify(o.image, o.digest))
        pending[handle] = (stage, base)

    # Tasks come back through the broker when a worker is lost (acks_late, leases).
    # Two things it cannot fix: no worker consumes a queue (said so, with the command
    # that starts one, every ``check`` seconds of silence), and a result lost between a
    # worker and the driver: when nothing at all has finished, been delivered or been
    # due after a retry's countdown (the tasks' records) for ``stall`` seconds while
    # workers are there, the driver asks again for what it waits on (tasks are
    # idempotent), and counts it.
    stall = max(120.0, 2 * verify_timeout) if executor == "celery" else None
    check = 20.0
    try:
        grouped = {b for g in groups.values() for b in g}
        for b in bases:
            if b in groups:
                submit("relayer", b)
            elif b not in grouped:
                submit("derive", b)
        last_save, last_result, last_check = 0.0, time.monotonic(), time.monotonic()
        while pending:
            for handle, res in ex.wait(set(pending), timeout=0.5):
                stage, base = pending.pop(handle)
                last_result = time.monotonic()
                if stage == "relayer" and not res.get("ok"):  # nothing lost: the plain path
                    log(f"re-layering the {len(groups[base])} bases of {base.rsplit(':', 1)[0]} failed "
                        f"({res.get('error', 'unknown error')}): deriving them one by one")
                    for b in groups[base]:
                        submit("derive", b)
                    continue
                for b, r in (zip(groups[base], res["results"]) if stage == "relayer" else [(base, res)]):
                    _apply(state, outcomes[b], "verify" if stage == "verify" else "derive", r)
                    if stage != "verify" and outcomes[b].ok and b in to_verify:
                        submit("verify", b)
            now = time.monotonic()
            idle = now - last_result
            if stall and pending and idle > check and now - last_check > check:
                last_check = now
                waiting = {_queue(stage) for stage, _ in pending.values()}
                missing = ex.unconsumed(waiting)  # None: the broker is away, nothing to do now
                for q in missing or []:
                    n = sum(1 for stage, _ in pending.values() if _queue(stage) == q)
                    log(f"no worker consumes queue {q!r} on {_redacted(settings.broker_url)}: {n} task(s) wait "
                        f"there; start one with `{ex.start_hint(q)}`")
                if missing:
                    last_result = now  # a stall with no consumer is not a lost result: do not ask again
                elif missing is not None and idle > stall and (busy := ex.last_activity(pending)) is None:
                    pass  # the broker is away again: nothing to judge by
                elif missing is not None and idle > stall and time.time() - busy < stall:
                    last_result = now - max(0.0, time.time() - busy)  # delivered, or waits out a countdown
                elif missing is not None and idle > stall:
                    log(f"no result for {stall:.0f}s: asking again for {len(pending)} task(s) (idempotent)")
                    stale = list(pending.values())
                    state.resubmitted += len(stale)
                    pending.clear()  # a late answer to an old handle is simply not waited for
                    for stage, base in stale:
                        submit(stage, base)
                    last_result = now
            if on_progress:
                on_progress(state)
            if now - last_save > 1.0:
                save_state(settings, state)
                last_save = now
        state.status = "finished"
    except KeyboardInterrupt:
        interrupted = True
        state.status = "interrupted"
    finally:
        if threading_main():
            signal.signal(signal.SIGTERM, old_handler)
        if isinstance(ex, CeleryExecutor):
            counts = ex.deliveries()
            state.redelivered = counts.get("redelivered_tasks", 0)
            state.extra_deliveries = counts.get("extra_deliveries", 0)
        ex.close()
        state.finished = time.time()
        lock = _write_lockfile(settings, cat, outcomes, recipe, lockfile, dataset) if lockfile else None
        save_state(settings, state)
    if interrupted:
        raise KeyboardInterrupt
    return BatchResult(state, outcomes, cat, lock)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _apply(state: BatchState, o: Outcome, stage: str, res: dict[str, Any]) -> None:
    if stage == "derive":
        if res.get("ok"):
            o.ok, o.skipped = True, bool(res.get("skipped"))
            o.image, o.digest, o.base_digest = res["image"], res["digest"], res["base_digest"]
            if o.skipped:
                state.skipped += 1
            else:
                state.derived += 1
        else:
            o.ok, o.error, o.stage = False, res.get("error", "unknown error"), "derive"
            state.failed += 1
            state.failures.append({"base": o.base, "stage": "derive", "reason": o.error})
    else:
        o.verified = bool(res.get("verified"))
        o.verify_skipped = bool(res.get("skipped"))
        if o.verified:
            state.verified += 1
        else:
            o.error, o.stage = res.get("error", "verify failed"), "verify"
            state.verify_failed += 1
            state.failures.append({"base": o.base, "stage": "verify", "reason": o.error})


def _write_lockfile(settings: Settings, cat: Catalog, outcomes: dict[str, Outcome], recipe: Any,
                    path: Path, dataset: str) -> Lockfile:
    from . import attest
    from imagefarm.names.reference import parse

    old = None
    if Path(path).exists():
        try:
            old = Lockfile.read(path)
        except ConfigError:
            old = None
    client = jobs.appender(settings).client
    entries = []
    checked: dict[str, bool] = {}
    for inst in cat.instances:
        o = outcomes.get(str(inst.base))
        if o is None or not o.ok:
            continue
        verified = o.verified
        if verified is None:  # not checked in this batch: does the registry hold a record?
            if o.digest not in checked:
                checked[o.digest] = attest.is_verified(client, parse(o.image), o.digest)
            verified = checked[o.digest]
        entries.append(Entry(inst.instance_id, inst.split, o.base, o.base_digest, o.image, o.digest,
                             recipe.name, recipe.digest, recipe.agent_server_version, bool(verified)))
    lock = Lockfile.merge(old, entries, dataset=dataset, to=settings.to)
    lock.write(path)
    return lock
