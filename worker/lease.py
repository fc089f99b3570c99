"""A heartbeat-extended lease on the messages a worker holds.

Kombu's Redis transport keeps every delivered, unacknowledged message in the
``unacked`` hash, scored in ``unacked_index`` by delivery time; any worker's sweep puts
a message whose score is older than the visibility timeout back on its queue. That
timeout is the only way the broker learns a worker died with a task in hand (its main
process SIGKILLed, or its "restoring unacknowledged messages" at shutdown cut short
because Redis was down at that moment). A long timeout makes the dead worker's tasks
wait for hours; a short one would hand running tasks to a second worker. So the
timeout is short (``IMAGEFARM_VISIBILITY_TIMEOUT``, 30 s) and each live worker's main
process re-scores the messages it holds (reserved or running) every few seconds: a
task is redelivered a visibility timeout after its worker stopped renewing, never
while it runs.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from celery import bootsteps
from celery.worker import state

log = logging.getLogger(__name__)


def held_tags() -> list[str]:
    """Delivery tags of the requests this worker holds: waiting, running, or set aside
    until their ETA (a countdown, e.g. a rate-limit pause). Taken from another thread:
    the weak sets may change while they are copied, so copy again."""
    for _ in range(5):
        try:
            reqs = set(state.reserved_requests) | set(state.active_requests) | set(state.scheduled_requests)
            break
        except RuntimeError:
            continue
    else:
        return []
    tags = []
    for r in reqs:
        tag = getattr(getattr(r, "message", None), "delivery_tag", None)
        if tag and not getattr(r, "acknowledged", False):
            tags.append(tag)
    return tags


class Lease(bootsteps.StartStopStep):
    """Worker bootstep: a thread renewing ``unacked_index`` scores of held messages."""

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker) -> None:
        app = worker.app
        opts = app.conf.broker_transport_options or {}
        visibility = float(opts.get("visibility_timeout", 3600))
        prefix = opts.get("global_keyprefix", "")
        key = prefix + opts.get("unacked_index_key", "unacked_index")
        client = redis.Redis.from_url(app.conf.broker_url, socket_timeout=5, socket_connect_timeout=0.5)
        every = max(0.5, visibility / 6)
        self._thread = threading.Thread(target=self._run, args=(client, key, every), name="imagefarm-lease",
                                        daemon=True)
        self._thread.start()

    def _run(self, client: redis.Redis, key: str, every: float) -> None:
        down = False
        while not self._stop.is_set():
            tags = held_tags()
            try:
                if tags:
                    now = time.time()
                    client.zadd(key, {t: now for t in tags}, xx=True)  # xx: never revive an acked one
                if down:
                    log.warning("lease: broker reachable again, %d held message(s) renewed", len(tags))
                down = False
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if not down:
                    log.warning("lease: cannot renew held messages (%s); retrying", exc)
                down = True
            # while the broker is away, retry ten times a second: when it is back the
            # renewal must land before any restore sweep sees the old scores (a consumer's
            # own reconnect, which sweeps at once, waits seconds between its attempts)
            self._stop.wait(0.1 if down else every)

    def stop(self, worker) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
