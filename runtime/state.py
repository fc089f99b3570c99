"""Persistent runtime records: sqlite (stdlib) under ``state_dir/runtime/``.

One row per live runtime, written before its container is created and deleted after
it is removed, so a restarted server finds its runtimes again and a container with
no row is a crash leftover. The file holds session API keys: the directory is 0700
and the database 0600. A lock file keeps a second server off the same state.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import sqlite3
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from imagefarm.errors import ConfigError
from imagefarm.host.statedir import private_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runtimes (
    runtime_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL UNIQUE,
    data TEXT NOT NULL
);
"""


@dataclass
class Record:
    runtime_id: str
    session_id: str
    container: str
    image: str               #: as requested
    prebuilt: str            #: pinned repo@sha256 that runs
    base: str | None
    host_port: int
    container_port: int
    url: str
    session_api_key: str
    user: str | None         #: effective --user ("" = the image's own user)
    status: str              #: running | paused | error   (API "status")
    pod_status: str          #: pending | running | ready | failed | crashloopbackoff | unknown
    created_at: float
    last_activity: float
    resource_factor: float = 1.0
    ready_at: float | None = None
    exit_code: int | None = None
    reason: str = ""
    pod_logs: str = ""
    restart_count: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Record":
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class Store:
    def __init__(self, root: Path, record: type = Record) -> None:
        self.root = private_dir(root)
        self.record = record
        self._lock_fh = None
        path = self.root / "runtimes.sqlite"
        new = not path.exists()
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        if new:
            os.chmod(path, 0o600)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    # -- exclusive use ------------------------------------------------------------
    def lock(self) -> None:
        """Refuse a second server on the same state directory."""
        fh = open(self.root / "server.lock", "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise ConfigError(
                f"another runtime server (pid {holder}) uses the state directory {self.root}: "
                "stop it, or give this one its own IMAGEFARM_STATE_DIR") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._lock_fh = fh

    def close(self) -> None:
        self.db.close()
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    # -- meta ---------------------------------------------------------------------
    def server_id(self) -> str:
        """A stable id for this state directory (labels on every container)."""
        row = self.db.execute("SELECT value FROM meta WHERE key='server_id'").fetchone()
        if row:
            return row[0]
        sid = secrets.token_hex(6)
        self.db.execute("INSERT INTO meta (key, value) VALUES ('server_id', ?)", (sid,))
        return sid

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    # -- records ------------------------------------------------------------------
    def put(self, rec: Any) -> None:
        self.db.execute(
            "INSERT INTO runtimes (runtime_id, session_id, data) VALUES (?, ?, ?) "
            "ON CONFLICT(runtime_id) DO UPDATE SET session_id=excluded.session_id, data=excluded.data",
            (rec.runtime_id, rec.session_id, rec.to_json()))

    def delete(self, runtime_id: str) -> None:
        self.db.execute("DELETE FROM runtimes WHERE runtime_id=?", (runtime_id,))

    def all(self) -> list[Record]:
        return [self.record.from_json(r[0]) for r in self.db.execute("SELECT data FROM runtimes")]
