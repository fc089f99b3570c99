"""The runtimes a server knows, by id and by session: one index for a node and a front.

``Records`` is a read-only mapping (runtime id -> record) over a ``Store``: every change
goes through it (``add``, ``save``, ``touch``, ``forget``) so the sqlite rows, the
session index and whoever listens (a node reports each change to its front) never
disagree. ``live_session``/``replace_session`` are the two halves of an idempotent
``/start``: a live runtime of the session is answered again; a dead one is forgotten
and handed back so its container can be removed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterator

from .errors import UnknownRuntime
from .state import Store

#: the statuses of a runtime that holds its slot and answers the trainer
LIVE = ("running", "paused")


class Records(Mapping):
    def __init__(self, store: Store) -> None:
        self.store = store
        self._by_id: dict[str, Any] = {}
        self.by_session: dict[str, str] = {}
        #: called with each record that changed or was forgotten
        self.on_change: list[Callable[[Any], None]] = []
        #: called with each record a client call touched
        self.on_touch: list[Callable[[Any], None]] = []

    # -- the mapping ----------------------------------------------------------------
    def __getitem__(self, rid: str) -> Any:
        return self._by_id[rid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    # -- changes ----------------------------------------------------------------------
    def load(self) -> None:
        """Index what the store holds (a restarted server)."""
        for rec in self.store.all():
            self._index(rec)

    def _index(self, rec: Any) -> None:
        self._by_id[rec.runtime_id] = rec
        self.by_session[rec.session_id] = rec.runtime_id

    def add(self, rec: Any) -> None:
        """Index and persist a new record (no await in here: a caller's check-then-add is atomic)."""
        self._index(rec)
        self.save(rec)

    def save(self, rec: Any) -> None:
        self.store.put(rec)
        for fn in self.on_change:
            fn(rec)

    def rekey(self, rec: Any, session_id: str) -> None:
        """Give a record another session (a warm sandbox handed to a /start)."""
        if self.by_session.get(rec.session_id) == rec.runtime_id:
            del self.by_session[rec.session_id]
        rec.session_id = session_id
        self.by_session[session_id] = rec.runtime_id
        self.save(rec)

    def touch(self, rec: Any, now: float) -> None:
        rec.last_activity = now
        self.save(rec)
        for fn in self.on_touch:
            fn(rec)

    def forget(self, rid: str) -> Any:
        rec = self._by_id.pop(rid, None)
        if rec and self.by_session.get(rec.session_id) == rid:
            del self.by_session[rec.session_id]
        self.store.delete(rid)
        if rec:
            for fn in self.on_change:
                fn(rec)
        return rec

    # -- questions --------------------------------------------------------------------
    def get_or_raise(self, rid: str) -> Any:
        rec = self._by_id.get(rid)
        if rec is None:
            raise UnknownRuntime(f"no runtime {rid!r} on this server (stopped, reaped or never started)")
        return rec

    def session(self, session_id: str) -> Any | None:
        rid = self.by_session.get(session_id)
        return self._by_id[rid] if rid else None

    def by_session_id(self, session_id: str) -> Any:
        rec = self.session(session_id)
        if rec is None:
            raise UnknownRuntime(f"no runtime for session {session_id!r}")
        return rec

    def live_session(self, session_id: str) -> Any | None:
        """The live runtime of ``session_id`` (a second /start answers it), or None."""
        rec = self.session(session_id)
        return rec if rec is not None and rec.status in LIVE else None

    def replace_session(self, session_id: str) -> Any | None:
        """Forget a dead runtime of ``session_id`` so a new one can take the session;
        returns it (its container is the caller's to remove)."""
        rec = self.session(session_id)
        if rec is None or rec.status in LIVE:
            return None
        return self.forget(rec.runtime_id)
