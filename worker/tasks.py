"""Celery tasks: thin wrappers over ``imagefarm.farm.jobs`` with retry policy.

Transient errors (registry 429/5xx, dropped connections, Redis blips) retry with
exponential backoff; permanent ones (base not found, malformed reference) come back
as a failed result at once, with the reason.
"""

from __future__ import annotations

from typing import Any

import redis

from imagefarm.farm import jobs
from imagefarm.errors import ImagefarmError
from imagefarm.settings import Settings
from .app import app
from .semaphore import RedisSemaphore

RETRY = dict(autoretry_for=(ImagefarmError, ConnectionError, OSError), retry_backoff=2, retry_backoff_max=120,
             retry_jitter=True, max_retries=8)


def _slots(settings: Settings) -> RedisSemaphore:
    client = redis.Redis.from_url(app.conf.broker_url)
    return RedisSemaphore(client, "registry", settings.registry_concurrency)


@app.task(name="imagefarm.derive", bind=True, **RETRY)
def derive(self, base: str, to: str, recipe: str, layer: dict[str, Any] | None = None,
           publish: bool = True) -> dict[str, Any]:
    settings = Settings.load(to=to, recipe=recipe)
    with _slots(settings).slot():
        return jobs.derive_base(settings, base, recipe, layer, publish)


@app.task(name="imagefarm.verify", bind=True, **RETRY)
def verify(self, image: str, digest: str, to: str, recipe: str, timeout: float = 120.0) -> dict[str, Any]:
    settings = Settings.load(to=to, recipe=recipe)
    return jobs.verify_image(settings, image, digest, timeout)
