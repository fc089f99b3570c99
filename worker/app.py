"""The Celery app: Redis broker and result backend, at-least-once delivery.

A task is acknowledged only after it finished (``acks_late``) and is requeued if its
worker process dies (``reject_on_worker_lost``); each worker takes one task at a time
(prefetch 1). An unacknowledged task whose whole worker vanished comes back through the
broker after the visibility timeout (30 s, ``IMAGEFARM_VISIBILITY_TIMEOUT``): live
workers renew the messages they hold (``lease.py``), so a running task is never handed
out twice for being long. Every task is idempotent (an existing tag with matching
annotations is "done"), so a redelivery is harmless; each delivery is counted in Redis
(``tasks.py``) so the driver can report repeated work.

Broker loss: the worker retries the connection for ever, running tasks keep running;
``imagefarm worker`` restarts a Celery worker that exits anyway (``supervise.py``).

Start a worker: ``imagefarm worker --queues derive`` (or ``celery -A
imagefarm.worker.app worker -Q derive,verify``); Flower works against the same broker.
"""

from __future__ import annotations

import os

from celery import Celery

from imagefarm.errors import ConfigError
from imagefarm.settings import Settings

DERIVE_QUEUE = "derive"
VERIFY_QUEUE = "verify"


def _visibility_timeout() -> int:
    raw = os.environ.get("IMAGEFARM_VISIBILITY_TIMEOUT", "30")
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 5:
        raise ConfigError(f"IMAGEFARM_VISIBILITY_TIMEOUT must be a whole number of seconds, at least 5, not {raw!r}")
    return value


def use_broker(app: Celery, url: str) -> None:
    """Point ``app`` at the Redis ``url`` (broker and results). ``rediss://`` is TLS with
    certificates checked: Celery refuses a rediss:// URL that says nothing about them."""
    app.conf.broker_url = app.conf.result_backend = url
    if url.startswith("rediss://") and "ssl_cert_reqs" not in url:
        import ssl

        app.conf.broker_use_ssl = app.conf.redis_backend_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def make_app(broker_url: str | None = None) -> Celery:
    settings = Settings.load()
    url = broker_url or settings.broker
    visibility = _visibility_timeout()
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
        broker_transport_options={
            "visibility_timeout": visibility,
            # sweep for expired leases every 5 s, each sweep a real scan (kombu's
            # defaults, 10 s x every 10th call, would add 100 s to a dead worker's tasks)
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 1,
            # a sweep cut short by a broker kill leaves its mutex behind (AOF keeps it):
            # let it lapse within one visibility timeout, not kombu's 5 minutes
            "unacked_mutex_expire": visibility,
            "health_check_interval": 10,
        },
        result_backend_transport_options={"visibility_timeout": visibility},
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,
        broker_connection_max_retries=None,  # a broker outage is waited out, however long
        # running tasks finish across a connection loss (their lease keeps them theirs)
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # a Redis restart or blip must not fail a task that did its work, nor the
        # driver polling for results: result reads and writes retry with backoff
        # (10 ms doubling to 10 s, about 5 minutes in all) before giving up
        result_backend_always_retry=True,
        result_backend_max_retries=40,
        result_backend_base_sleep_between_retries_ms=10,
        result_backend_max_sleep_between_retries_ms=10_000,
        task_routes={
            "imagefarm.derive": {"queue": DERIVE_QUEUE},
            "imagefarm.relayer": {"queue": DERIVE_QUEUE},
            "imagefarm.verify": {"queue": VERIFY_QUEUE},
        },
        worker_hijack_root_logger=False,
    )
    use_broker(app, url)
    from .lease import Lease

    app.steps["worker"].add(Lease)
    return app


app = make_app()
