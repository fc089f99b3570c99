"""Where a batch's units of work run: a local thread pool (the embedded default, no
Redis) or Celery on Redis (workers on CPU nodes). Both take the same units
(``imagefarm.farm.jobs``) and hand back the same answers, so the driver is one."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Protocol

from . import jobs
from imagefarm.errors import ImagefarmError
from imagefarm.registry.ratelimit import RateLimited
from imagefarm.settings import Settings


class Executor(Protocol):
    name: str

    def derive(self, base: str, publish: bool) -> Any: ...
    def relayer(self, bases: list[str], publish: list[str]) -> Any: ...
    def verify(self, image: str, digest: str) -> Any: ...
    def wait(self, handles: set[Any], timeout: float) -> Iterator[tuple[Any, dict[str, Any]]]: ...
    def unconsumed(self, queues: set[str]) -> list[str] | None: ...
    def start_hint(self, queue: str) -> str: ...
    def deliveries(self) -> dict[str, int]: ...
    def last_activity(self, handles) -> float | None: ...
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

    def unconsumed(self, queues: set[str]) -> list[str] | None:
        return []  # the pool consumes every queue

    def start_hint(self, queue: str) -> str:
        return ""

    def deliveries(self) -> dict[str, int]:
        return {}  # a thread pool delivers each unit once

    def last_activity(self, handles) -> float | None:
        return time.time()  # threads are never lost: always alive

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
        from imagefarm.worker.app import app, use_broker

        use_broker(app, settings.broker)
        self.settings, self.layer, self.verify_timeout, self.app = settings, layer, verify_timeout, app
        self.submitted: list[str] = []

    def derive(self, base: str, publish: bool):
        from imagefarm.worker import tasks

        return self._send(tasks.derive, [base, self.settings.to, self.settings.recipe, self.layer, publish])

    def relayer(self, bases: list[str], publish: list[str]):
        from imagefarm.worker import tasks

        return self._send(tasks.relayer, [bases, self.settings.to, self.settings.recipe, self.layer, publish])

    def verify(self, image: str, digest: str):
        from imagefarm.worker import tasks

        return self._send(tasks.verify, [image, digest, self.settings.to, self.settings.recipe, self.verify_timeout])

    @property
    def _version(self) -> dict[str, str]:
        """The recipe's version travels with each task (a worker's settings lack the flag)."""
        v = self.settings.agent_server_version
        return {"version": v} if v else {}

    def _send(self, task: Any, args: list[Any]):
        """Send one task, waiting out a broker that is away (a Redis restart) as the
        workers' retries do; after ``BROKER_PATIENCE`` the batch stops with a clear error
        (its state is saved, a rerun skips what is done)."""
        import redis
        from kombu.exceptions import OperationalError

        from imagefarm.worker.tasks import BROKER_PATIENCE, broker_patient

        def away(exc: BaseException) -> bool:
            # RuntimeError: Celery's result subscriber gave up reconnecting (it tries
            # again on the next send)
            return isinstance(exc, OperationalError) or (
                isinstance(exc, RuntimeError) and isinstance(exc.__cause__, redis.ConnectionError))

        try:
            handle = broker_patient(lambda: task.apply_async(args=args, kwargs=self._version), away)
        except (OperationalError, RuntimeError) as exc:
            if not away(exc):
                raise
            raise ImagefarmError(f"the broker {redacted(self.settings.broker_url)} took no task for "
                                 f"{BROKER_PATIENCE:.0f} s ({exc}): is Redis running? run the same "
                                 "command again once it is (what is done is skipped)") from None
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
        return f"imagefarm worker --queues {queue} --broker-url {redacted(self.settings.broker_url)}"

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


def redacted(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(url)
    if u.password:
        u = u._replace(netloc=f"{u.username or ''}:***@{u.hostname}" + (f":{u.port}" if u.port else ""))
    return urlunsplit(u)
