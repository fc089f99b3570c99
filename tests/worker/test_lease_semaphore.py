"""Units for the worker's Redis parts, on a real redis-server (the session one): the
semaphore's cap, expiry and Redis-away paths, and the lease thread's renewals. The
fault tests in tests/reliability show them under SIGKILL; here each one's own edges."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from types import SimpleNamespace

import pytest
import redis

from imagefarm.host.services import free_port
from imagefarm.worker import lease as lease_mod
from imagefarm.worker.lease import Lease, held_tags
from imagefarm.worker.semaphore import RedisSemaphore


@pytest.fixture
def client(redis_server):
    c = redis.Redis.from_url(redis_server.url)
    yield c
    c.close()


def _unreachable() -> redis.Redis:
    """A client of a port nothing listens on, without redis-py's own retries (seconds each)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis(port=free_port(), socket_connect_timeout=0.2, socket_timeout=0.2, retry=Retry(NoBackoff(), 0))


# -- semaphore -------------------------------------------------------------------------------
def test_semaphore_caps_holders_and_frees_on_release(client):
    sem = RedisSemaphore(client, f"t-{uuid.uuid4().hex}", limit=2)
    a, b = sem.try_acquire(), sem.try_acquire()
    assert a and b and a != b
    assert sem.try_acquire() is None  # the cap holds
    sem.release(a)
    c = sem.try_acquire()
    assert c and client.zcard(sem.key) == 2
    sem.release(a)  # releasing twice is harmless
    assert client.zcard(sem.key) == 2


def test_semaphore_slot_of_a_dead_holder_frees_when_its_lease_runs_out(client):
    sem = RedisSemaphore(client, f"t-{uuid.uuid4().hex}", limit=1, lease=0.3)
    assert sem.try_acquire()  # never released: its holder "died"
    assert sem.try_acquire() is None
    with sem.slot(timeout=30):  # waits until the lease expires, then holds the slot
        assert client.zcard(sem.key) == 1
    assert client.zcard(sem.key) == 0  # the context gives it back


def test_semaphore_slot_times_out_naming_the_key(client):
    sem = RedisSemaphore(client, f"t-{uuid.uuid4().hex}", limit=1)
    held = sem.try_acquire()
    with pytest.raises(TimeoutError, match=sem.key):
        with sem.slot(timeout=0.2):
            pass
    sem.release(held)


def test_semaphore_release_gives_up_on_an_unreachable_redis_and_leaves_it_to_the_lease():
    sem = RedisSemaphore(_unreachable(), "t-away", limit=1)
    sem.release("token", patience=0.3)  # returns (no exception): the lease frees the slot


def test_semaphore_slot_waits_for_redis_like_for_a_busy_slot():
    sem = RedisSemaphore(_unreachable(), "t-away", limit=1)
    with pytest.raises(TimeoutError):  # connection errors were retried, not raised
        with sem.slot(timeout=0.5):
            pass


# -- lease -----------------------------------------------------------------------------------
class _Req:
    def __init__(self, tag, acknowledged=False):
        self.message, self.acknowledged = SimpleNamespace(delivery_tag=tag), acknowledged


def test_held_tags_are_the_unacknowledged_requests_in_every_state():
    from celery.worker import state

    reqs = [_Req("r1"), _Req("a1"), _Req("s1"), _Req("done", acknowledged=True), _Req(None)]
    state.reserved_requests.add(reqs[0])
    state.active_requests.update([reqs[1], reqs[3]])
    state.scheduled_requests.update([reqs[2], reqs[4]])
    try:
        assert sorted(held_tags()) == ["a1", "r1", "s1"]
    finally:
        for r in reqs:
            for s in (state.reserved_requests, state.active_requests, state.scheduled_requests):
                s.discard(r)


def _wait_for(cond, what, polls=300):
    for _ in range(polls):
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"never: {what}")


def test_lease_renews_held_messages_only_and_never_revives_an_acked_one(client, monkeypatch):
    key = f"t-unacked-{uuid.uuid4().hex}"
    client.zadd(key, {"held": 1.0, "other": 1.0})
    monkeypatch.setattr(lease_mod, "held_tags", lambda: ["held", "acked-meanwhile"])
    step = Lease.__new__(Lease)  # the thread alone, without a worker around it
    step._stop, step._thread = threading.Event(), None
    t = threading.Thread(target=step._run, args=(client, key, 0.1), daemon=True)
    t.start()
    try:
        _wait_for(lambda: client.zscore(key, "held") > 1.0, "the held message re-scored")
    finally:
        step._stop.set()
        t.join(5)
    assert not t.is_alive()
    assert client.zscore(key, "other") == 1.0  # not ours: left for the sweep
    assert client.zscore(key, "acked-meanwhile") is None  # xx: not added back


def test_lease_keeps_trying_while_the_broker_is_away_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(lease_mod, "held_tags", lambda: ["held"])
    step = Lease.__new__(Lease)
    step._stop, step._thread = threading.Event(), None
    tries = []
    client = _unreachable()
    real_zadd = client.zadd
    client.zadd = lambda *a, **k: (tries.append(1), real_zadd(*a, **k))[1]
    with caplog.at_level(logging.WARNING, logger=lease_mod.__name__):
        t = threading.Thread(target=step._run, args=(client, "k", 60.0), daemon=True)
        t.start()
        _wait_for(lambda: len(tries) >= 3, "three renewal attempts")  # retried fast, not every 60 s
        step._stop.set()
        t.join(5)
    assert not t.is_alive()
    assert sum("cannot renew" in r.message for r in caplog.records) == 1
