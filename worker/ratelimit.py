"""The rate-limit gate in Redis: every Celery worker of a batch pauses together.

The same state machine as ``imagefarm.registry.ratelimit.LocalGate`` (read that
module's docstring for the why), kept in one Redis hash per (registry, account) and
changed only by the two Lua scripts below, so the check and the change are one step.
Counted requests in flight are members of a sorted set scored by lease expiry: a
worker SIGKILLed mid-request frees its place when the lease runs out. Times are the
Redis server's clock (``TIME``), so nodes with skewed clocks agree on when a pause ends.
"""

from __future__ import annotations

import math
import time
import uuid

import redis

from imagefarm.errors import TransientRegistryError
from imagefarm.registry.ratelimit import GateStatus, Observation, Permit, RateLimited, key_of

PREFIX = "imagefarm:ratelimit:"
KEYS = PREFIX + "keys"
#: seconds a counted request may stay unanswered before its place is given back
LEASE = 120.0
#: seconds an unreachable Redis is waited for before a counted request fails (transient)
BROKER_PATIENCE = 300.0
#: seconds what a registry said about a budget is kept after its last answer
KEEP = 2 * 24 * 3600

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

ACQUIRE = _NOW + """
redis.call('SADD', KEYS[3], KEYS[1])
if redis.call('HSETNX', KEYS[1], 'registry', ARGV[3]) == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
redis.call('HSETNX', KEYS[1], 'account', ARGV[4])
local paused = tonumber(redis.call('HGET', KEYS[1], 'paused_until') or '0')
if paused > 0 and now >= paused then
  redis.call('HSET', KEYS[1], 'paused_until', '0')
  redis.call('HDEL', KEYS[1], 'remaining')
  paused = 0
end
if paused > 0 then return {'paused', tostring(paused - now)} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local inflight = redis.call('ZCARD', KEYS[2])
local rem = redis.call('HGET', KEYS[1], 'remaining')
local allowed = -1
if rem then allowed = tonumber(rem)
elseif redis.call('HEXISTS', KEYS[1], 'limit') == 1 then allowed = 1 end
if allowed < 0 or inflight < allowed then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
  return {'ok', '0'}
end
return {'busy', '0'}
"""

RELEASE = _NOW + """
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[2], ARGV[1]) end
if ARGV[2] == '1' then
  if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'limit', ARGV[3]) end
  if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'window', ARGV[4]) end
  if ARGV[5] ~= '' then
    local cur = redis.call('HGET', KEYS[1], 'remaining')
    if (not cur) or tonumber(ARGV[5]) < tonumber(cur) then
      redis.call('HSET', KEYS[1], 'remaining', ARGV[5])
    end
  end
  if ARGV[6] == '1' then
    redis.call('HSET', KEYS[1], 'remaining', '0')
    local until_ = now + tonumber(ARGV[7])
    if until_ > tonumber(redis.call('HGET', KEYS[1], 'paused_until') or '0') then
      redis.call('HSET', KEYS[1], 'paused_until', tostring(until_))
    end
  end
  redis.call('EXPIRE', KEYS[1], ARGV[8])
end
return 1
"""


def _s(v: object) -> str:
    return "" if v is None else str(v)


class RedisGate:
    """``Gate`` for all processes of a farm, in the broker's Redis."""

    POLL = 0.1

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._acquire = client.register_script(ACQUIRE)
        self._release = client.register_script(RELEASE)

    @classmethod
    def from_url(cls, url: str) -> "RedisGate":
        return cls(redis.Redis.from_url(url, socket_timeout=10, decode_responses=True))

    def _keys(self, key: str) -> list[str]:
        return [PREFIX + key, PREFIX + key + ":inflight", KEYS]

    def acquire(self, registry: str, account: str, counted: bool, max_wait: float = math.inf) -> Permit:
        key = key_of(registry, account)
        if not counted:
            return Permit(key, False)
        token = uuid.uuid4().hex
        deadline = time.monotonic() + max_wait
        away_since = time.monotonic()
        while True:
            try:
                state, wait = self._acquire(keys=self._keys(key),
                                            args=[token, LEASE, registry, account, KEEP])
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Redis restarting is waited out, like the slot semaphore does: failing here
                # would send the task into a retry whose countdown outlasts the outage
                if time.monotonic() > away_since + BROKER_PATIENCE:
                    raise TransientRegistryError(f"the rate-limit gate in Redis is unreachable: {exc}") from None
                time.sleep(0.5)
                continue
            except redis.RedisError as exc:
                raise TransientRegistryError(f"the rate-limit gate in Redis is unreachable: {exc}") from None
            away_since = time.monotonic()
            if state == "ok":
                return Permit(key, True, token)
            wait = float(wait)
            if state == "paused" and time.monotonic() + wait > deadline:
                raise RateLimited(self._status(key) or GateStatus(registry, account, None, 0, None,
                                                                  time.time() + wait))
            time.sleep(min(wait, 1.0) if state == "paused" else self.POLL)

    def release(self, permit: Permit, seen: Observation | None) -> None:
        if not permit.counted and seen is None:
            return
        args = [permit.token, "0" if seen is None else "1"]
        if seen is not None:
            args += [_s(seen.limit), _s(seen.window), _s(seen.remaining), "1" if seen.spent else "0",
                     str(seen.pause()), str(int(max(KEEP, 2 * seen.pause())))]
        try:
            self._release(keys=self._keys(permit.key), args=args)
        except redis.RedisError:
            pass  # the lease gives the place back; the next answer brings the budget

    def _status(self, key: str) -> GateStatus | None:
        h = self.client.hgetall(PREFIX + key)
        if not h:
            return None
        sec, usec = self.client.time()
        skew = time.time() - (sec + usec / 1e6)  # paused_until is in Redis' clock
        paused = float(h.get("paused_until") or 0)
        return GateStatus(h.get("registry", ""), h.get("account", ""),
                          int(h["limit"]) if "limit" in h else None,
                          int(h["remaining"]) if "remaining" in h else None,
                          float(h["window"]) if "window" in h else None,
                          paused + skew if paused else 0.0)

    def status(self) -> list[GateStatus]:
        out = []
        for k in sorted(self.client.smembers(KEYS)):
            st = self._status(k[len(PREFIX):])
            if st is None:
                self.client.srem(KEYS, k)  # expired
            elif st.limit is not None or st.paused_until:
                out.append(st)
        return out
