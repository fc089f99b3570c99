"""The Celery app: Redis broker and result backend, at-least-once delivery.

A task is acknowledged only after it finished (``acks_late``) and is requeued if its
worker process dies (``reject_on_worker_lost``); each worker takes one task at a time
(prefetch 1); an unacknowledged task whose whole worker vanished comes back after the
visibility timeout, which is longer than the longest task. Every task is idempotent
(an existing tag with matching annotations is "done"), so a redelivery is harmless.

Start a worker: ``imagefarm worker --queues derive`` (or ``celery -A
imagefarm.worker.app worker -Q derive,verify``); Flower works against the same broker.
"""

from __future__ import annotations

import os

from celery import Celery

from imagefarm.settings import Settings

DERIVE_QUEUE = "derive"
VERIFY_QUEUE = "verify"


def make_app(broker_url: str | None = None) -> Celery:
    settings = Settings.load()
    url = broker_url or settings.broker_url
    visibility = int(os.environ.get("IMAGEFARM_VISIBILITY_TIMEOUT", "7200"))
    app = Celery("imagefarm", broker=url, backend=url, include=["imagefarm.worker.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=7 * 24 * 3600,
        broker_transport_options={"visibility_timeout": visibility},
        result_backend_transport_options={"visibility_timeout": visibility},
        broker_connection_retry_on_startup=True,
        # a Redis restart or blip must not fail a task that did its work, nor the
        # driver polling for results: result reads and writes retry with backoff
        # (10 ms doubling to 10 s, about 5 minutes in all) before giving up
        result_backend_always_retry=True,
        result_backend_max_retries=40,
        result_backend_base_sleep_between_retries_ms=10,
        result_backend_max_sleep_between_retries_ms=10_000,
        task_routes={
            "imagefarm.derive": {"queue": DERIVE_QUEUE},
            "imagefarm.verify": {"queue": VERIFY_QUEUE},
        },
        worker_hijack_root_logger=False,
    )
    return app


app = make_app()
