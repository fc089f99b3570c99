"""The batch: every base of a dataset -> a derived, verified agent-server image.

One driver over two executors (``executors``: a local thread pool, or Celery on Redis)
with the same units of work (``jobs``). Derives are submitted first; each finished
derive that is chosen for verification (``selection``) queues a verify on its own queue.
Progress is shown live and saved under the state directory (``batchstate``), so
``imagefarm status`` can report a running or finished batch; the lockfile is written
at the end (``pinning``). Re-running redoes nothing finished: a tag that holds the same
derive is "done", a recorded verification is "verified".

Publishing: an image chosen for verification is pushed by digest only; its tag (what
lookups and runtimes find) is put when it has booted and answered. Images left out of
the sample (``--verify N`` / ``none``) are tagged at once: that is the caller's choice.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .batchstate import BatchState, Outcome, apply, save_state
from .catalog import Catalog, load
from .executors import CeleryExecutor, Executor, LocalExecutor, redacted
from .lockfile import Lockfile
from .pinning import write_lockfile
from .selection import choose_verify, relayer_groups
from imagefarm.errors import ConfigError
from imagefarm.settings import Settings


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class BatchConfig:
    """How a batch runs (the ``prebuild`` options): each default written once, here; checked
    when made, before any payload is pushed."""

    executor: str = field(default="local",
                          metadata=_help("local (thread pool, no Redis) or celery (workers on the broker)"))
    limit: int | None = field(default=None, metadata=_help("only the first N unique bases"))
    verify: str = field(default="all", metadata=_help("boot-check all, none, or a sample of N images"))
    workers: int = field(default=8, metadata=_help("local executor: parallel derives"))
    verify_timeout: float = field(default=120.0, metadata=_help("seconds an image may take to answer /alive"))

    def __post_init__(self) -> None:
        if self.executor not in ("local", "celery"):
            raise ConfigError(f"--executor must be local or celery, not {self.executor!r}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, not {self.limit}")
        choose_verify([], self.verify)  # all, none or a number, said in its own words
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, not {self.workers}")
        if not self.verify_timeout > 0:
            raise ConfigError(f"--verify-timeout must be a positive number of seconds, not {self.verify_timeout}")


@dataclass(frozen=True)
class BatchResult:
    state: BatchState
    outcomes: dict[str, Outcome]
    catalog: Catalog
    lockfile: Lockfile | None


def _queue(stage: str) -> str:
    return "derive" if stage == "relayer" else stage


class Batch:
    """One running batch over an executor: what is pending there and each base's outcome.

    ``submit`` hands one unit to the executor; ``apply`` folds its answer back in and
    submits what follows from it (the verify of a derive chosen for one; the one-by-one
    derives of a group whose re-layering failed). No clock, no signals, no disk: the
    driver (``run_batch``) owns those.
    """

    def __init__(self, state: BatchState, executor: Executor, bases: list[str], to_verify: set[str],
                 groups: dict[str, list[str]] | None = None, log: Callable[[str], None] = lambda m: None) -> None:
        self.state, self.ex, self.to_verify, self.log = state, executor, to_verify, log
        self.groups = groups or {}  #: first base -> the bases re-layered together with it
        self.bases = bases
        self.outcomes = {b: Outcome(b) for b in bases}
        self.pending: dict[Any, tuple[str, str]] = {}  #: executor handle -> (stage, base)

    def start(self) -> None:
        """Submit every base: a group's re-layering under its first base (the groups first,
        in ``relayer_groups``' order: largest first, the longest tasks start first), the
        rest one by one."""
        grouped = {b for g in self.groups.values() for b in g}
        for first in self.groups:
            self.submit("relayer", first)
        for b in self.bases:
            if b not in grouped:
                self.submit("derive", b)

    def submit(self, stage: str, base: str) -> None:
        """``stage`` derive, verify or relayer (``base`` then names the group by its first
        base). An image chosen for verification is derived untagged: tagged once verified."""
        if stage == "relayer":
            group = self.groups[base]
            handle = self.ex.relayer(group, [b for b in group if b not in self.to_verify])
        elif stage == "derive":
            handle = self.ex.derive(base, base not in self.to_verify)
        else:
            o = self.outcomes[base]
            handle = self.ex.verify(o.image, o.digest)
        self.pending[handle] = (stage, base)

    def apply(self, handle: Any, res: dict[str, Any]) -> None:
        """Fold the answer to ``handle`` in; an answer to a handle no longer waited on (asked
        again since) is dropped."""
        if handle not in self.pending:
            return
        stage, base = self.pending.pop(handle)
        if stage == "relayer" and not res.get("ok"):  # nothing lost: the plain path
            self.log(f"re-layering the {len(self.groups[base])} bases of {base.rsplit(':', 1)[0]} failed "
                     f"({res.get('error', 'unknown error')}): deriving them one by one")
            self.state.relayer_fallbacks.append({"group": base, "bases": len(self.groups[base]),
                                                 "reason": res.get("error", "unknown error")})
            for b in self.groups[base]:
                self.submit("derive", b)
            return
        if stage == "relayer":
            self.state.relayer_mtime_differs += res.get("mtime_differs", 0)
        for b, r in (zip(self.groups[base], res["results"]) if stage == "relayer" else [(base, res)]):
            apply(self.state, self.outcomes[b], "verify" if stage == "verify" else "derive", r)
            if stage != "verify" and self.outcomes[b].ok and b in self.to_verify:
                self.submit("verify", b)

    def waiting(self) -> dict[str, int]:
        """Queue -> how many pending units wait there."""
        out: dict[str, int] = {}
        for stage, _ in self.pending.values():
            out[_queue(stage)] = out.get(_queue(stage), 0) + 1
        return out

    def ask_again(self) -> int:
        """Submit again everything pending (units are idempotent); a late answer to an old
        handle is then not waited for. Counted in ``resubmitted``."""
        stale = list(self.pending.values())
        self.state.resubmitted += len(stale)
        self.pending.clear()
        for stage, base in stale:
            self.submit(stage, base)
        return len(stale)


def run_batch(settings: Settings, dataset: str, *, executor: str = BatchConfig.executor,
              limit: int | None = BatchConfig.limit, verify: str = BatchConfig.verify, lockfile: Path | None = None,
              workers: int = BatchConfig.workers, verify_timeout: float = BatchConfig.verify_timeout,
              on_progress: Callable[[BatchState], None] | None = None,
              log: Callable[[str], None] = lambda m: None, relayer: bool = False) -> BatchResult:
    """``relayer``: the bases of one repository are re-layered together (``derive.relayer``,
    one task per group) instead of derived one by one; a repository with one base is
    derived as usual. The options are checked first (``BatchConfig``)."""
    BatchConfig(executor, limit, verify, workers, verify_timeout)
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
    groups = {g[0]: g for g in relayer_groups(bases, settings.relayer_group_max) if len(g) > 1} if relayer else {}
    batch = Batch(state, ex, bases, choose_verify(bases, verify), groups, log)
    interrupted = False
    old_handler = signal.getsignal(signal.SIGTERM)

    def _term(*_: Any) -> None:
        raise KeyboardInterrupt

    if threading_main():
        signal.signal(signal.SIGTERM, _term)

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
        batch.start()
        last_save, last_result, last_check = 0.0, time.monotonic(), time.monotonic()
        while batch.pending:
            for handle, res in ex.wait(set(batch.pending), timeout=0.5):
                batch.apply(handle, res)
                last_result = time.monotonic()
            now = time.monotonic()
            idle = now - last_result
            if stall and batch.pending and idle > check and now - last_check > check:
                last_check = now
                waiting = batch.waiting()
                missing = ex.unconsumed(set(waiting))  # None: the broker is away, nothing to do now
                for q in missing or []:
                    log(f"no worker consumes queue {q!r} on {redacted(settings.broker_url)}: {waiting[q]} task(s) "
                        f"wait there; start one with `{ex.start_hint(q)}`")
                if missing:
                    last_result = now  # a stall with no consumer is not a lost result: do not ask again
                elif missing is not None and idle > stall and (busy := ex.last_activity(batch.pending)) is None:
                    pass  # the broker is away again: nothing to judge by
                elif missing is not None and idle > stall and time.time() - busy < stall:
                    last_result = now - max(0.0, time.time() - busy)  # delivered, or waits out a countdown
                elif missing is not None and idle > stall:
                    log(f"no result for {stall:.0f}s: asking again for {len(batch.pending)} task(s) (idempotent)")
                    batch.ask_again()
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
        counts = ex.deliveries()
        state.redelivered = counts.get("redelivered_tasks", 0)
        state.extra_deliveries = counts.get("extra_deliveries", 0)
        ex.close()
        state.finished = time.time()
        lock = write_lockfile(settings, cat, batch.outcomes, recipe, lockfile, dataset) if lockfile else None
        save_state(settings, state)
    if interrupted:
        raise KeyboardInterrupt
    return BatchResult(state, batch.outcomes, cat, lock)


def threading_main() -> bool:
    return threading.current_thread() is threading.main_thread()
