"""A task's retry meets a broker that is away: real Celery (its ``Task.retry``, kombu's
producer) against a real Redis that is SIGKILLed and comes back 4 s later.

Celery sends a retry as a new message and, when the broker cannot take it, rejects the
task for good (``Reject(requeue=False)``): its base would be lost, with no result for the
driver to read. The farm's tasks (``worker/tasks.py``, ``FarmTask``) wait for the broker
instead. Judged from the broker: the retry message, same task id and one retry more,
sits on its queue after the restart, and was sent only once Redis was back.

Known: in this test Celery's own ``Task.retry`` (FarmTask without its override) passes
as well -- kombu's publish waits for the broker here -- although the same call in a plain
script with ``broker_connection_max_retries=2`` raises ``Reject`` (docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import redis
from celery.exceptions import Retry

from imagefarm.worker import tasks
from imagefarm.worker.app import VERIFY_QUEUE, app


@pytest.fixture
def broker_at(own_redis):
    """The app on ``own_redis``, its connection retries bounded as an operator may set
    them (``broker_connection_max_retries``; unbounded in the farm's app, where Celery's
    own publish then waits too): Celery's retry then gives up while the broker is away."""
    old = app.conf.broker_url, app.conf.result_backend, app.conf.broker_connection_max_retries
    app.conf.broker_url = app.conf.result_backend = own_redis.url
    app.conf.broker_connection_max_retries = 2
    yield own_redis
    app.conf.broker_url, app.conf.result_backend, app.conf.broker_connection_max_retries = old


def test_retry_waits_for_the_broker_to_come_back(broker_at):
    own_redis = broker_at
    tid = uuid.uuid4().hex
    args = ["127.0.0.1:1/x/y:z", "sha256:" + "0" * 64, "127.0.0.1:1/farm", "default", 60.0]

    task = tasks.verify

    def retry(task_id: str) -> None:
        task.push_request(id=task_id, args=args, kwargs={}, retries=0, called_directly=False, is_eager=False,
                          delivery_info={"exchange": "", "routing_key": VERIFY_QUEUE}, hostname="test@here")
        try:
            with pytest.raises(Retry):
                task.retry(exc=OSError("the registry reset the connection"), countdown=0)
        finally:
            task.pop_request()

    retry(f"warm-{tid}")  # a retry sent while the broker is up: the producer's connection is made
    own_redis.kill()
    back = threading.Timer(4.0, own_redis.start)
    back.start()
    t0 = time.monotonic()
    try:
        retry(tid)
    finally:
        back.join()
    assert time.monotonic() - t0 >= 3.0, "the retry was sent before the broker came back: it never was away"
    queued = [json.loads(m) for m in redis.Redis.from_url(own_redis.url).lrange(VERIFY_QUEUE, 0, -1)]
    mine = [m for m in queued if m["headers"]["id"] == tid]
    assert len(mine) == 1, queued
    assert mine[0]["headers"]["retries"] == 1 and mine[0]["headers"]["task"] == "imagefarm.verify", mine[0]["headers"]


def test_the_driver_sends_a_task_once_the_broker_is_back(own_redis):
    """The prebuild driver submits verify tasks as derives finish, so a submission can
    meet a Redis restart (seen in the Redis-rounds test: the driver died of kombu's
    ``OperationalError``). Its send waits the broker out: the task is on the queue once,
    sent after the restart. The sender is its own process, as the driver is."""
    import subprocess
    import sys

    own_redis.kill()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(own_redis.url).ping()  # the broker is away when the send starts
    code = ("import sys; from imagefarm.settings import Settings; from imagefarm.farm.executors import CeleryExecutor; "
            "s = Settings.load().model_copy(update={'broker_url': sys.argv[1]}); "
            "print(CeleryExecutor(s, None).verify('127.0.0.1:1/x/y:z', 'sha256:' + '0' * 64).id)")
    sender = subprocess.Popen([sys.executable, "-c", code, own_redis.url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    back = threading.Timer(20.0, own_redis.start)  # as long as the rounds' longest
    back.start()
    try:
        out, err = sender.communicate(timeout=120)
    finally:
        back.join()
        sender.kill()
    assert sender.returncode == 0, err[-3000:]
    task_id = out.strip()
    queued = [json.loads(m) for m in redis.Redis.from_url(own_redis.url).lrange(VERIFY_QUEUE, 0, -1)]
    mine = [m for m in queued if m["headers"]["id"] == task_id]
    assert len(mine) == 1 and mine[0]["headers"]["task"] == "imagefarm.verify", queued
