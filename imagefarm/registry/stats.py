"""Counters of registry traffic, for benchmarks and for each DeriveResult.

A client keeps one ``Stats`` for its whole life; ``track()`` opens a second one for
the current thread (a context variable), so concurrent derives sharing a client
each get their own exact counts.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass, field, fields
from typing import Iterator


@dataclass
class Stats:
    requests: int = 0
    retries: int = 0
    bytes_up: int = 0          # request bodies (blob and manifest uploads)
    bytes_down: int = 0        # response bodies read (manifests, configs, copied blobs)
    blobs_uploaded: int = 0    # blobs whose bytes were sent (upload or cross-registry copy)
    blob_bytes_uploaded: int = 0
    blobs_mounted: int = 0
    blobs_skipped: int = 0     # already present (HEAD hit or known)
    rate_limited: int = 0      # 429 answers (each waited out at the rate-limit gate)
    pulls: int = 0             # manifest GETs answered with a pull budget (or 429): what a limit counts
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


_current: contextvars.ContextVar[tuple[Stats, ...]] = contextvars.ContextVar("imagefarm_stats", default=())


class StatsSink:
    """What a client counts into: its own totals plus any ``track()`` scopes open now."""

    def __init__(self) -> None:
        self.total = Stats()

    def add(self, **counts: int) -> None:
        self.total.add(**counts)
        for s in _current.get():
            s.add(**counts)

    @contextlib.contextmanager
    def track(self) -> Iterator[Stats]:
        s = Stats()
        token = _current.set((*_current.get(), s))
        try:
            yield s
        finally:
            _current.reset(token)
