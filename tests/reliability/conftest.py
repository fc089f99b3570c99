"""Reliability fixtures: private services a test may restart, the lookup API in a thread
with its logs captured, and small helpers that wait on conditions (never on the clock
alone: every loop has a generous deadline and stops by itself)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

import httpx
import pytest
import uvicorn

from imagefarm import oci
from imagefarm.derive import Appender, AppendPayload
from imagefarm.farm.lockfile import Lockfile
from imagefarm.names.reference import parse
from imagefarm.payload.recipe import recipe_for
from imagefarm.host.services import Redis, Registry, free_port
from tests.farm.conftest import Workers

T = TypeVar("T")


def wait_for(cond: Callable[[], T], what: str, timeout: float = 300.0, every: float = 0.05) -> T:
    """Poll ``cond`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def catalog_tags(registry: Registry) -> dict[str, list[str]]:
    """Every repository of ``registry`` and its tags."""
    repos = httpx.get(f"{registry.url}/v2/_catalog", params={"n": 1000}, timeout=30).json()["repositories"]
    out = {}
    for repo in repos:
        r = httpx.get(f"{registry.url}/v2/{repo}/tags/list", timeout=30)
        out[repo] = sorted(r.json().get("tags") or []) if r.status_code == 200 else []
    return out


def assert_batch_complete(registry: Registry, lockfile: Path, bases: list[str], to: str) -> Lockfile:
    """Nothing lost: a lockfile entry per base, each a whole manifest whose blobs all exist.
    Nothing duplicated: each derived repository holds exactly the tags the lockfile names."""
    lock = Lockfile.read(lockfile)
    assert sorted(e.base for e in lock.entries) == sorted(bases)
    accept = f"{oci.OCI_MANIFEST}, {oci.DOCKER_MANIFEST}"
    for e in lock.entries:
        ref = parse(e.image)
        assert e.image.startswith(to + "/")
        r = httpx.get(f"{registry.url}/v2/{ref.repository}/manifests/{ref.tag}", headers={"Accept": accept},
                      timeout=30)
        assert r.status_code == 200, (e.image, r.status_code)
        assert r.headers["Docker-Content-Digest"] == e.image_digest
        m = r.json()
        for d in [m["config"], *m["layers"]]:
            h = httpx.head(f"{registry.url}/v2/{ref.repository}/blobs/{d['digest']}", timeout=30)
            assert h.status_code == 200, (e.image, d["digest"], h.status_code)
            assert int(h.headers["Content-Length"]) == d["size"], (e.image, d["digest"])
    tags = catalog_tags(registry)
    for repo in {parse(e.image).repository for e in lock.entries}:
        mine = sorted(parse(e.image).tag for e in lock.entries if parse(e.image).repository == repo)
        # sha256-<hex>.<kind>: the signed artifacts beside an image (record, provenance), not images
        assert [t for t in tags[repo] if not t.startswith("sha256-")] == mine, repo
    return lock


@pytest.fixture
def target():
    """A private registry the test may stop and restart (the session one is shared)."""
    with Registry.create() as reg:
        yield reg


@pytest.fixture
def own_redis():
    """A private Redis (appendonly, fsync always) the test may restart."""
    with Redis.create() as r:
        yield r


@pytest.fixture
def workers_for(tmp_path):
    """workers_for(env) -> Workers: real Celery workers as processes, all stopped at the end."""
    made: list[Workers] = []

    def make(env: dict[str, str]) -> Workers:
        (tmp_path / f"workers{len(made)}").mkdir()
        w = Workers(env, tmp_path / f"workers{len(made)}")
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop_all()


@pytest.fixture(scope="session")
def small_payload(settings, tmp_path_factory) -> AppendPayload:
    """A one-file stand-in payload named as the default recipe (lookups find what it derives)."""
    recipe = recipe_for(settings)
    layer = oci.write_layer([oci.dir_entry("usr"), oci.dir_entry("usr/local"), oci.dir_entry("usr/local/bin"),
                             oci.file_entry("usr/local/bin/openhands-agent-server", b"#!/bin/sh\necho stand-in\n",
                                            0o755)],
                            tmp_path_factory.mktemp("rel-payload"))
    return AppendPayload(layer, recipe.name, recipe.digest, recipe.agent_server_version, tuple(recipe.env))


@pytest.fixture(scope="session")
def derive_to(settings, small_payload):
    """derive_to(base_ref, to) -> DeriveResult with the stand-in payload."""
    appender = Appender(settings)
    yield lambda base, to: appender.derive(base, small_payload, to=to)
    appender.close()


class LogCapture(logging.Handler):
    """Every record of every logger, formatted, kept for inspection."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if record.args:
                line += " " + json.dumps(record.args, default=str)
        except Exception:  # noqa: BLE001 - a log line that cannot be formatted is kept raw
            line = repr(record.__dict__)
        with self._guard:
            self.lines.append(line)

    @property
    def text(self) -> str:
        with self._guard:
            return "\n".join(self.lines)


class ApiServer:
    def __init__(self, url: str, logs: LogCapture, lookup, app) -> None:
        self.url, self.logs, self.lookup, self.app = url, logs, lookup, app


@pytest.fixture
def lookup_api(settings, registry):
    """lookup_api(to, api_key=None) -> ApiServer: the real app on uvicorn in a thread, with
    access logs on and every log record (uvicorn, fastapi, imagefarm) captured at DEBUG.
    Without ``api_key`` it runs with auth disabled, explicitly (the app's default is a key)."""
    from imagefarm.serve.lookup import Lookup
    from imagefarm.serve.lookup_api import create_app

    started: list[tuple[uvicorn.Server, threading.Thread, object, LogCapture, list]] = []

    def start(to: str, api_key: str | None = None, **lookup_kw) -> ApiServer:
        lk = Lookup(settings.model_copy(update={"to": to}), **lookup_kw)
        cap = LogCapture()
        cap.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        root = logging.getLogger()
        old_level = root.level
        root.addHandler(cap)
        root.setLevel(logging.DEBUG)
        port = free_port()
        app = create_app(lk, api_key=api_key, disable_auth=api_key is None)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                               log_level="debug", access_log=True, log_config=None,
                                               limit_concurrency=None, backlog=2048))
        t = threading.Thread(target=server.run, daemon=True)
        t.start()
        wait_for(lambda: server.started or not t.is_alive(), "the lookup API to start", timeout=60)
        assert server.started, "the lookup API did not start"
        started.append((server, t, lk, cap, [root, old_level]))
        return ApiServer(f"http://127.0.0.1:{port}", cap, lk, app)

    yield start
    for server, t, lk, cap, (root, old_level) in started:
        server.should_exit = True
        t.join(30)
        lk.close()
        root.removeHandler(cap)
        root.setLevel(old_level)


# -- the runtime server's fixtures (tests/runtime), reused as they are ------------------------------
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "runtime"))
from tests.runtime.conftest import (client as rt_client, lookup, prebuilt, rt_settings, rt_to,  # noqa: E402,F401
                                    server_factory, standin_layer)
