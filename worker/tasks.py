"""Celery tasks: thin wrappers over ``imagefarm.farm.jobs`` with retry policy.

Transient errors (registry 5xx, dropped connections, Redis blips) retry with
exponential backoff; permanent ones (base not found, malformed reference) come back
as a failed result at once, with the reason. A spent pull budget is neither: every
worker passes the same rate-limit gate in Redis, and a task that meets a closed gate
is put back (same task id, no retry used up) to run when it opens.

Every delivery of a task is counted in ``imagefarm:task:<id>`` (a hash: ``deliveries``,
``redelivered`` -- the broker put it back after a lost worker --, ``retries`` -- the
task's own retries --, ``paused`` -- sent again to wait for the rate-limit gate --, the
worker process that took it last, ``seen`` -- when, epoch -- and ``eta`` -- when a retry
or a pause sent it again to run): the broker-side record the driver reads to report
repeated work, and to tell a task that waits out a countdown from a lost one.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import redis
from celery import Task
from celery.exceptions import Ignore, Reject

from imagefarm.farm import jobs
from imagefarm.errors import ImagefarmError
from imagefarm.registry import ratelimit
from imagefarm.settings import Settings
from .app import app
from .ratelimit import RedisGate
from .semaphore import RedisSemaphore

#: backoff capped at 30 s (a task never waits long after a fault cleared: batches end
#: within a minute of it), with retries enough for about 4 minutes of a registry outage
RETRY = dict(autoretry_for=(ImagefarmError, ConnectionError, OSError), retry_backoff=2, retry_backoff_max=30,
             retry_jitter=True, max_retries=12)
#: how long a retry waits for a broker that is away before Celery's rejection stands
BROKER_PATIENCE = 300.0


class FarmTask(Task):
    """A task whose retry outlasts a broker outage.

    Celery sends a retry as a new message and, when the broker cannot take it, rejects
    the task for good (``Reject(requeue=False)``): a transient error that meets a Redis
    restart would fail its base. Here the retry waits for the broker instead."""

    def retry(self, *args: Any, **kwargs: Any):  # noqa: ANN201 - raises Retry, as Celery's does
        countdown = kwargs.get("countdown")
        _note_eta(self, kwargs["eta"].timestamp() if kwargs.get("eta") else
                  time.time() + (self.default_retry_delay if countdown is None else countdown))
        return broker_patient(lambda: super(FarmTask, self).retry(*args, **kwargs),
                              lambda exc: isinstance(exc, Reject))


def broker_patient(call: Callable[[], Any], away: Callable[[BaseException], bool],
                   patience: float = BROKER_PATIENCE) -> Any:
    """``call()``, called again (backing off to 5 s) while it fails in a way ``away`` says
    means the broker is away; after ``patience`` seconds that failure is raised."""
    deadline, delay = time.monotonic() + patience, 0.5
    while True:
        try:
            return call()
        except Exception as exc:
            if not away(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


RECORD_TTL = 7 * 24 * 3600
_client: tuple[int, redis.Redis] | None = None


def task_key(task_id: str) -> str:
    return f"imagefarm:task:{task_id}"


def _redis() -> redis.Redis:
    """One client per (forked) process: pool processes must not share a parent's sockets."""
    global _client
    if _client is None or _client[0] != os.getpid():
        _client = (os.getpid(), redis.Redis.from_url(app.conf.broker_url))
    return _client[1]


def _record_delivery(task, patience: float = 300.0) -> None:
    """Count this delivery before the work starts. A task can start while the broker is
    away (it was prefetched): the record waits for Redis like the task's other Redis
    calls do, and after ``patience`` the work goes ahead unrecorded."""
    req = task.request
    info = req.delivery_info or {}
    key = task_key(req.id)
    arg = (req.args or [""])[0]
    arg = " ".join(arg) if isinstance(arg, list) else arg  # a re-layering group: its bases
    deadline, delay = time.monotonic() + patience, 0.2
    while True:
        try:
            _redis().pipeline(transaction=False) \
                .hincrby(key, "deliveries", 1) \
                .hincrby(key, "redelivered", 1 if info.get("redelivered") else 0) \
                .hset(key, mapping={"pid": os.getpid(), "retries": req.retries or 0, "name": task.name,
                                    "seen": f"{time.time():.3f}",
                                    "arg": arg, "host": req.hostname or socket.gethostname()}) \
                .expire(key, RECORD_TTL) \
                .execute()
            return
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                return
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _note_eta(task, when: float) -> None:
    """The epoch at which this task, sent again with a countdown, is due: the driver does
    not take a task that waits out its countdown for a lost one."""
    try:
        _redis().hset(task_key(task.request.id), "eta", f"{when:.3f}")
    except redis.RedisError:
        pass  # the driver then sees the delivery time only, and waits its stall timer


def _count(task, field_: str) -> None:
    try:
        _redis().hincrby(task_key(task.request.id), field_, 1)
    except redis.RedisError:
        pass  # best effort: the record then shows one unexplained delivery more


def _slots(settings: Settings) -> RedisSemaphore:
    return RedisSemaphore(_redis(), "registry", settings.registry_concurrency)


#: a task set aside for a long pause wakes at least this often (a countdown longer than
#: the broker's visibility timeout would be delivered twice)
MAX_COUNTDOWN = 600.0


def _gate() -> None:
    """This process's clients pass the farm's gate in Redis (installed once per process)."""
    if not isinstance(ratelimit.current(), RedisGate):
        ratelimit.install(RedisGate.from_url(app.conf.broker_url))


@app.task(name="imagefarm.derive", bind=True, base=FarmTask, **RETRY)
def derive(self, base: str, to: str, recipe: str, layer: dict[str, Any] | None = None,
           publish: bool = True, version: str | None = None) -> dict[str, Any]:
    _record_delivery(self)
    settings = Settings.load(to=to, recipe=recipe, agent_server_version=version)
    return _paced(self, settings, lambda: jobs.derive_base(settings, base, recipe, layer, publish))


def _paced(task, settings: Settings, work) -> dict[str, Any]:
    """Run ``work`` in a registry slot behind the farm's rate-limit gate; a spent pull
    budget puts the task back instead of failing it."""
    _gate()
    try:
        with _slots(settings).slot():
            return work()
    except ratelimit.RateLimited as exc:
        # sent again under the same id (the driver's handle stays valid) with the same
        # retry count: waiting for a window uses up none of the retries for real errors
        wait = max(0.0, min(MAX_COUNTDOWN, exc.until - time.time()))
        _count(task, "paused")
        _note_eta(task, time.time() + wait)
        task.apply_async(args=task.request.args, kwargs=task.request.kwargs, task_id=task.request.id,
                         countdown=wait, retries=task.request.retries)
        raise Ignore() from None


@app.task(name="imagefarm.relayer", bind=True, base=FarmTask, **RETRY)
def relayer(self, bases: list[str], to: str, recipe: str, layer: dict[str, Any] | None = None,
            publish: list[str] | None = None, version: str | None = None) -> dict[str, Any]:
    """One repository's group of bases, re-layered on one worker (they share layers)."""
    _record_delivery(self)
    settings = Settings.load(to=to, recipe=recipe, agent_server_version=version)
    return _paced(self, settings, lambda: jobs.relayer_group(settings, bases, recipe, layer, publish))


@app.task(name="imagefarm.verify", bind=True, base=FarmTask, **RETRY)
def verify(self, image: str, digest: str, to: str, recipe: str, timeout: float = 120.0,
           version: str | None = None) -> dict[str, Any]:
    _record_delivery(self)
    settings = Settings.load(to=to, recipe=recipe, agent_server_version=version)
    with _one_at_a_time(f"imagefarm:verify:{digest}", ttl=timeout + 300):
        return jobs.verify_image(settings, image, digest, timeout)


@contextmanager
def _one_at_a_time(key: str, ttl: float) -> Iterator[None]:
    """One boot check per image at a time, farm-wide. A second delivery of a running
    verify (its lease renewal lost the race with a restore sweep after a long broker
    outage on a starved node) waits for the first, then finds its record and skips: one
    boot, one record. Redis away: the check goes ahead unlocked (a second record is then
    the cost, not a lost image)."""
    lock = _redis().lock(key, timeout=ttl, blocking_timeout=ttl)
    try:
        held = lock.acquire()
    except redis.RedisError:
        held = False
    try:
        yield
    finally:
        if held:
            try:
                lock.release()
            except redis.RedisError:  # expired or Redis away: the ttl frees it
                pass
