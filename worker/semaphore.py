"""A counting semaphore in Redis: a global cap on concurrent registry work.

Holders are members of a sorted set scored by lease expiry; a holder that dies
(SIGKILL, lost node) stops renewing and its slot frees itself when the lease runs
out, so a crash never shrinks the farm's capacity for good. Redis going away for a
moment (a restart) is waited out: acquiring keeps polling, releasing retries and
otherwise leaves the slot to its lease, so work that was done is never failed for it.
"""

from __future__ import annotations

import random
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

import redis

ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
  return 1
end
return 0
"""


class RedisSemaphore:
    def __init__(self, client: redis.Redis, name: str, limit: int, lease: float = 600.0) -> None:
        self.client, self.key, self.limit, self.lease = client, f"imagefarm:sem:{name}", limit, lease
        self._acquire = client.register_script(ACQUIRE)

    def try_acquire(self) -> str | None:
        token = uuid.uuid4().hex
        now = time.time()
        ok = self._acquire(keys=[self.key], args=[now, now + self.lease, self.limit, token])
        return token if ok else None

    def release(self, token: str, patience: float = 60.0) -> None:
        """Give the slot back; if Redis stays unreachable, the lease frees it instead."""
        deadline = time.monotonic() + patience
        delay = 0.1
        while True:
            try:
                self.client.zrem(self.key, token)
                return
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() > deadline:
                    return  # the lease runs out on its own
            time.sleep(delay + random.random() * delay)
            delay = min(delay * 2, 5.0)

    @contextmanager
    def slot(self, timeout: float = 3600.0) -> Iterator[str]:
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                token = self.try_acquire()
            except (redis.ConnectionError, redis.TimeoutError):
                token = None  # Redis is restarting: wait for it like for a busy slot
            if token:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no free slot in {self.key} within {timeout}s")
            time.sleep(delay + random.random() * delay)
            delay = min(delay * 2, 1.0)
        try:
            yield token
        finally:
            self.release(token)
