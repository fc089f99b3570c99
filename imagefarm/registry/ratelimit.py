"""Rate limits shared by a whole batch: one gate per (source registry, account).

Docker Hub counts manifest GETs per account (or per address when anonymous) in a
window, and says where a caller stands on every manifest response:
``RateLimit-Limit: 100;w=21600`` and ``RateLimit-Remaining: 76;w=21600``. HEAD is not
counted, nor are blob GETs. When the budget is spent it answers 429.

A per-request retry loop is the wrong answer to that: every task backs off on its own,
keeps knocking (each knock another 429) and finally fails bases that would have
derived an hour later. Instead every counted request passes a ``Gate`` first. The gate
lets no more counted requests be in flight than the registry last said remain (one
probe while that is unknown), and when the budget is spent (remaining 0 or a 429) it
closes for that registry and account until the window resets (``Retry-After``,
``RateLimit-Reset``, or the ``w=`` the headers name). A caller that would wait longer
than it is willing to gets ``RateLimited`` with the time the gate opens: the batch sets
that base aside and takes it up again then, while bases from other registries go on.

``LocalGate`` serves the threads of one process (the local pool, the plan);
``imagefarm.worker.ratelimit.RedisGate`` the same state machine in Redis, so all Celery
workers pause together. ``install()`` picks the process's gate.
"""

from __future__ import annotations

import email.utils
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Mapping, Protocol

from imagefarm.errors import TransientRegistryError

#: a 429 that names no window at all (Docker Hub always names one): a short-lived
#: throttle, so a short pause
DEFAULT_PAUSE = 1.0


@dataclass(frozen=True, slots=True)
class Observation:
    """What one response said about the caller's budget."""

    status: int
    limit: int | None = None
    remaining: int | None = None
    window: float | None = None
    reset: float | None = None  #: seconds until the budget is whole again, where said

    @property
    def spent(self) -> bool:
        return self.status == 429 or self.remaining == 0

    def pause(self) -> float:
        """Seconds to stay closed once the budget is spent."""
        for v in (self.reset, self.window):
            if v is not None and v > 0:
                return v
        return DEFAULT_PAUSE


def _quota(value: str | None) -> tuple[int | None, float | None]:
    """``"76;w=21600"`` -> (76, 21600.0); also plain ``"76"``."""
    if not value:
        return None, None
    head, *params = [p.strip() for p in value.split(";")]
    try:
        n = int(head.split(",")[0])
    except ValueError:
        return None, None
    window = None
    for p in params:
        k, _, v = p.partition("=")
        if k.strip().lower() == "w":
            try:
                window = float(v)
            except ValueError:
                pass
    return n, window


def _seconds(value: str | None, now: float) -> float | None:
    """``Retry-After`` / ``RateLimit-Reset``: delta seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None


def observe(status: int, headers: Mapping[str, str], now: float | None = None) -> Observation | None:
    """The budget a response reports, or None if it says nothing about one."""
    now = time.time() if now is None else now
    limit, w1 = _quota(headers.get("RateLimit-Limit"))
    remaining, w2 = _quota(headers.get("RateLimit-Remaining"))
    reset = _seconds(headers.get("Retry-After"), now)
    if reset is None:
        reset = _seconds(headers.get("RateLimit-Reset"), now)
    if status != 429 and limit is None and remaining is None:
        return None
    return Observation(status, limit, remaining, w1 or w2, reset)


def counts(method: str, url: str) -> bool:
    """Does this request count against a pull limit? (Docker Hub: manifest GETs only.)"""
    return method == "GET" and "/manifests/" in url


@dataclass(frozen=True, slots=True)
class GateStatus:
    """Where one (registry, account) stands, for the progress line and the plan."""

    registry: str
    account: str           #: auth file user, or "anonymous"
    limit: int | None
    remaining: int | None
    window: float | None
    paused_until: float    #: epoch seconds; 0 when open

    def paused(self, now: float | None = None) -> bool:
        return self.paused_until > (time.time() if now is None else now)

    def line(self, now: float | None = None) -> str:
        """``docker.io: 0 of 200 pulls left, resuming in 5h12m; log in for a higher limit``"""
        now = time.time() if now is None else now
        left = "?" if self.remaining is None else str(max(0, self.remaining))
        of = f" of {self.limit}" if self.limit is not None else ""
        text = f"{self.registry}: {left}{of} pulls left"
        if self.paused(now):
            text += f", resuming in {human(self.paused_until - now)}"
        if self.account == "anonymous":
            text += f"; log in for a higher limit (podman login {self.registry})"
        else:
            text += f" (account {self.account})"
        return text


def human(seconds: float) -> str:
    s = max(0, int(math.ceil(seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class RateLimited(TransientRegistryError):
    """A registry's pull budget is spent; the gate opens again at ``until`` (epoch s).

    Not a failure: the batch takes the work up again then."""

    def __init__(self, status: GateStatus) -> None:
        self.status = status
        self.until = status.paused_until
        super().__init__(status.line())


@dataclass(frozen=True, slots=True)
class Permit:
    key: str
    counted: bool
    token: str = ""


class Gate(Protocol):
    def acquire(self, registry: str, account: str, counted: bool, max_wait: float) -> Permit: ...
    def release(self, permit: Permit, seen: Observation | None) -> None: ...
    def status(self) -> list[GateStatus]: ...


def key_of(registry: str, account: str) -> str:
    return f"{registry}|{account}"


@dataclass
class _State:
    registry: str
    account: str
    limit: int | None = None
    window: float | None = None
    remaining: int | None = None   #: None: unknown (first contact, or a window just reset)
    paused_until: float = 0.0
    inflight: int = 0              #: counted requests sent, not yet answered

    def view(self) -> GateStatus:
        return GateStatus(self.registry, self.account, self.limit, self.remaining, self.window,
                          self.paused_until)


class LocalGate:
    """The gate for the threads of one process."""

    #: a waiter re-checks at least this often (a peer's answer normally wakes it first)
    POLL = 0.25

    def __init__(self, clock=time.time) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._states: dict[str, _State] = {}

    def _state(self, registry: str, account: str) -> _State:
        k = key_of(registry, account)
        s = self._states.get(k)
        if s is None:
            s = self._states[k] = _State(registry, account)
        return s

    def acquire(self, registry: str, account: str, counted: bool, max_wait: float = math.inf) -> Permit:
        key = key_of(registry, account)
        if not counted:
            return Permit(key, False)
        deadline = time.monotonic() + max_wait
        with self._cond:
            while True:
                s = self._state(registry, account)
                now = self._clock()
                if s.paused_until and now >= s.paused_until:
                    s.paused_until, s.remaining = 0.0, None  # a new window: probe again
                if s.paused_until:
                    wait = s.paused_until - now
                    if time.monotonic() + wait > deadline:
                        raise RateLimited(s.view())
                elif s.inflight < _allowed(s):
                    s.inflight += 1
                    return Permit(key, True, uuid.uuid4().hex)
                else:
                    wait = self.POLL
                self._cond.wait(min(wait, self.POLL, max(0.0, deadline - time.monotonic())) or 0.01)

    def release(self, permit: Permit, seen: Observation | None) -> None:
        registry, _, account = permit.key.partition("|")
        with self._cond:
            s = self._state(registry, account)
            if permit.counted:
                s.inflight = max(0, s.inflight - 1)
            if seen is not None:
                _apply(s, seen, self._clock())
            self._cond.notify_all()

    def status(self) -> list[GateStatus]:
        with self._cond:
            return [s.view() for s in self._states.values() if s.limit is not None or s.paused_until]


def _allowed(s: _State) -> float:
    """Counted requests that may be in flight: the remaining budget; one probe when a
    limited registry's window has just reset; no cap where no limit was ever named."""
    if s.remaining is not None:
        return s.remaining
    return 1 if s.limit is not None else math.inf


def _apply(s: _State, seen: Observation, now: float) -> None:
    """Fold one answer into the state: the lowest remaining seen in this window wins
    (answers arrive out of order), and a spent budget closes the gate."""
    if seen.limit is not None:
        s.limit = seen.limit
    if seen.window is not None:
        s.window = seen.window
    if seen.remaining is not None:
        s.remaining = seen.remaining if s.remaining is None else min(s.remaining, seen.remaining)
    if seen.spent:
        s.remaining = 0
        s.paused_until = max(s.paused_until, now + seen.pause())


_gate: Gate = LocalGate()


def install(gate: Gate) -> Gate:
    """Make ``gate`` the one every client of this process passes (returns the old one)."""
    global _gate
    old, _gate = _gate, gate
    return old


def current() -> Gate:
    return _gate
