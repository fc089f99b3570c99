"""The shipped ``imagefarm worker``, started as a user starts it (heartbeats on): it
serves its queue, sends heartbeats, is started again by itself when its Celery worker
dies, and the tasks that worker held come back through the broker (their lease runs
out), not through the driver; SIGTERM ends it and everything it started."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from imagefarm.host.services import Redis, Registry
from tests.conftest import IMAGEFARM
from tests.farm.conftest import Workers
from tests.reliability.evidence import Evidence, task_records


def _wait(cond, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"gave up after {timeout:.0f}s waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_shipped_worker_heartbeats_restarts_and_stops(cli_env, fixtures, payload, tmp_path):
    from imagefarm.worker.app import make_app

    bases = [b.ref for b in fixtures.r2e_set(10)]
    with Redis.create() as broker, Registry.create(access_log=True) as target:
        to = f"{target.host}/shipped"
        env = {**cli_env, "IMAGEFARM_BROKER_URL": broker.url, "IMAGEFARM_TO": to}
        workers = Workers(env, tmp_path)
        try:
            w = workers.start("derive", concurrency=1, name="shipped")
            app = make_app(broker.url)
            # heartbeats: the worker's own worker-heartbeat events on the broker
            # (one subscription held for the whole wait: events are pub/sub, and a loop of
            # short captures can miss every 2 s beat between its unsubscribe and subscribe)
            beats: list[dict] = []
            with app.connection_for_read() as conn:
                recv = app.events.Receiver(conn, handlers={"worker-heartbeat": beats.append})
                try:
                    for _ in recv.itercapture(timeout=60, wakeup=False):
                        if beats:
                            break
                except (TimeoutError, socket.timeout):
                    pass
            assert beats and beats[0]["hostname"].startswith("shipped@"), workers.log(0)[-3000:]
            first_main = _wait(lambda: workers.celery_main(w), "the Celery worker under imagefarm worker")

            ds = tmp_path / "list.txt"
            ds.write_text("\n".join(bases) + "\n")
            driver = subprocess.Popen([IMAGEFARM, "prebuild", "--dataset", str(ds), "--executor", "celery",
                                       "--verify", "none", "--json", "--lockfile", str(tmp_path / "l.json")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                # the Celery worker's main process dies (as on kombu's "Unrecoverable error")
                # while one of its pool processes holds a task
                def holding():
                    pool = set(map(str, workers.pool(w)))
                    return [t for t, r in task_records(broker.url).items()
                            if r.get("pid") in pool and not _tagged(target, to, r.get("arg", ""))]
                held = _wait(lambda: driver.poll() is not None or holding(), "a task held by the pool")
                assert driver.poll() is None, driver.stderr.read()[-3000:]
                os.kill(first_main, signal.SIGKILL)
                killed_at = time.time()
                out, err = driver.communicate(timeout=600)
            except BaseException:
                driver.kill()
                raise
            assert driver.returncode == 0, err[-3000:] + workers.log(0)[-3000:]
            state = json.loads(out)
            log = workers.log(0)
            assert "celery worker exited with signal SIGKILL" in log and "restart 1" in log, log[-3000:]
            assert workers.celery_main(w) not in (None, first_main)
            assert state["failed"] == 0 and state["resubmitted"] == 0, state  # the broker gave it back
            records = task_records(broker.url)
            assert len(records) == len(bases)
            back = [records[t] for t in held]
            assert any(int(r["deliveries"]) >= 2 and int(r["redelivered"]) >= 1 for r in back), back
            assert state["redelivered"] >= 1, state
            ev = Evidence.read(target, to)
            ev.check(tmp_path / "l.json", bases)
            print(f"\nshipped worker: main process SIGKILLed holding {len(held)} task(s); restarted by "
                  f"imagefarm worker; batch done {state['finished'] - killed_at:.0f} s after the kill, "
                  f"redelivered by the broker {state['redelivered']}, driver resubmits {state['resubmitted']}")

            # SIGTERM: a warm shutdown, exit 0, no Celery process left behind
            main = workers.celery_main(w)
            os.kill(w.pid, signal.SIGTERM)
            assert w.wait(60) == 0, workers.log(0)[-3000:]
            _wait(lambda: subprocess.run(["pgrep", "-g", str(main)], capture_output=True).returncode == 1,
                  "the Celery worker's process group to be gone", timeout=30)
        finally:
            workers.stop_all()


def _tagged(target: Registry, to: str, base: str) -> bool:
    """Whether the derived tag of ``base`` is already put (its task is then done)."""
    repo = base.split("/", 1)[1].rsplit(":", 1)[0]
    tag = base.rsplit(":", 1)[1]
    return any(r.endswith(repo) and t.startswith(tag) for r, t in Evidence.read(target, to).tag_puts)


def test_supervisor_restarts_a_failed_child_and_stops_on_usage_errors(tmp_path):
    """The loop behind ``imagefarm worker``: a child that fails is started again (its exit
    code logged); a clean exit ends the loop; a usage error is not retried."""
    import sys

    from imagefarm.worker.supervise import supervise

    runs = tmp_path / "runs"
    script = ("import pathlib, sys; p = pathlib.Path(sys.argv[1]); n = len(p.read_text()) if p.exists() else 0; "
              "p.write_text('x' * (n + 1)); sys.exit(3 if n == 0 else 0)")
    said: list[str] = []
    assert supervise([sys.executable, "-c", script, str(runs)], said.append) == 0
    assert runs.read_text() == "xx"
    assert any("exit code 3" in m and "restart 1" in m for m in said), said
    said.clear()
    assert supervise([sys.executable, "-c", "import sys; sys.exit(64)"], said.append) == 64
    assert any("not restarting" in m for m in said), said


def test_bad_visibility_timeout_is_one_line(cli_env):
    from tests.conftest import imagefarm_cli

    proc = imagefarm_cli("worker", env={**cli_env, "IMAGEFARM_VISIBILITY_TIMEOUT": "soon"}, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: IMAGEFARM_VISIBILITY_TIMEOUT must be a whole number of seconds, at least 5, not 'soon'"]
