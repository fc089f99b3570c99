"""Celery tasks: thin wrappers over ``imagefarm.farm.jobs`` with retry policy.

Transient errors (registry 5xx, dropped connections, Redis blips) retry with
exponential backoff; permanent ones (base not found, malformed reference) come back
as a failed result at once, with the reason. A spent pull budget is neither: every
worker passes the same rate-limit gate in Redis, and a task that meets a closed gate
is put back (same task id, no retry used up) to run when it opens.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from celery.exceptions import Ignore

from imagefarm.farm import jobs
from imagefarm.errors import ImagefarmError
from imagefarm.registry import ratelimit
from imagefarm.settings import Settings
from .app import app
from .ratelimit import RedisGate
from .semaphore import RedisSemaphore

RETRY = dict(autoretry_for=(ImagefarmError, ConnectionError, OSError), retry_backoff=2, retry_backoff_max=120,
             retry_jitter=True, max_retries=8)


def _slots(settings: Settings) -> RedisSemaphore:
    client = redis.Redis.from_url(app.conf.broker_url)
    return RedisSemaphore(client, "registry", settings.registry_concurrency)


#: a task set aside for a long pause wakes at least this often (a countdown longer than
#: the broker's visibility timeout would be delivered twice)
MAX_COUNTDOWN = 600.0


def _gate() -> None:
    """This process's clients pass the farm's gate in Redis (installed once per process)."""
    if not isinstance(ratelimit.current(), RedisGate):
        ratelimit.install(RedisGate.from_url(app.conf.broker_url))


@app.task(name="imagefarm.derive", bind=True, **RETRY)
def derive(self, base: str, to: str, recipe: str, layer: dict[str, Any] | None = None,
           publish: bool = True) -> dict[str, Any]:
    settings = Settings.load(to=to, recipe=recipe)
    _gate()
    try:
        with _slots(settings).slot():
            return jobs.derive_base(settings, base, recipe, layer, publish)
    except ratelimit.RateLimited as exc:
        # sent again under the same id (the driver's handle stays valid) with the same
        # retry count: waiting for a window uses up none of the retries for real errors
        wait = max(0.0, min(MAX_COUNTDOWN, exc.until - time.time()))
        self.apply_async(args=self.request.args, kwargs=self.request.kwargs, task_id=self.request.id,
                         countdown=wait, retries=self.request.retries)
        raise Ignore() from None


@app.task(name="imagefarm.verify", bind=True, **RETRY)
def verify(self, image: str, digest: str, to: str, recipe: str, timeout: float = 120.0) -> dict[str, Any]:
    settings = Settings.load(to=to, recipe=recipe)
    return jobs.verify_image(settings, image, digest, timeout)
