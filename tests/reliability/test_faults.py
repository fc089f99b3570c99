"""Faults injected into real services while a batch runs, each shown to land mid-work and
judged by counting, not inferring: the registry's access log (tag PUTs, verification
records, blob uploads) and the tasks' delivery records in the broker (tests/reliability/
evidence.py). Workers are the shipped ``imagefarm worker`` (heartbeats on); crashes are
SIGKILLs. Each test prints its row of docs/RELIABILITY.md's fault table (``-s``).

Also: the disk filling up during a payload build.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from imagefarm.derive.append import PAYLOAD_REPO
from imagefarm.farm.lockfile import Lockfile
from tests.conftest import imagefarm_cli
from tests.reliability.conftest import assert_batch_complete, wait_for
from tests.reliability.evidence import Evidence, deliveries, open_uploads, row, task_records

HERE = "tests/reliability/test_faults.py"


def _dataset(tmp_path: Path, bases: list[str]) -> Path:
    path = tmp_path / "bases.txt"
    path.write_text("\n".join(bases) + "\n")
    return path


def _prebuild(env, dataset: Path, lockfile: Path, executor: str = "celery", verify: str = "none") -> subprocess.Popen:
    exe = str(Path(sys.executable).parent / "imagefarm")
    # a boot check of the real agent server took over 120 s at load 25 on the 2-core VM
    return subprocess.Popen([exe, "prebuild", "--dataset", str(dataset), "--executor", executor,
                             "--verify", verify, "--verify-timeout", "300", "--json", "--lockfile", str(lockfile)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, extra=lambda: "") -> tuple[dict, str]:
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the batch did not finish\n{err[-4000:]}\n{extra()}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{err[-4000:]}\n{out[-2000:]}\n{extra()}"
    return json.loads(out), err


def assert_no_long_countdown(records: dict[str, dict[str, str]], cleared: float, bound: float = 60.0) -> None:
    """No task was set to wait (a retry's or a pause's countdown, its record's ``eta``)
    past ``bound`` seconds after the last fault cleared: the design bound on how long a
    batch outlives a fault, read from the records (the time it took is printed in the
    row; on a loaded 2-core machine a boot check alone can take minutes)."""
    late = {tid: float(r["eta"]) - cleared for tid, r in records.items() if float(r.get("eta") or 0) > cleared + bound}
    assert not late, f"tasks due more than {bound:.0f} s after the fault cleared: {late}"


def _tag_puts(target, to: str) -> int:
    return sum(Evidence.read(target, to).tag_puts.values())


@pytest.fixture
def farm(cli_env, fixtures, own_redis, workers_for, tmp_path):
    """A private, access-logged target registry, a private Redis, shipped workers."""
    from imagefarm.host.services import Registry

    with Registry.create(access_log=True) as target:
        to = f"{target.host}/faults"
        env = {**cli_env, "IMAGEFARM_BROKER_URL": own_redis.url, "IMAGEFARM_TO": to}
        yield target, to, env, workers_for(env)


def _bases(fixtures, n: int) -> list[str]:
    return [b.ref for b in fixtures.r2e_set(n)]


def _logs(workers) -> str:
    return "\n".join(f"--- worker {i}\n" + workers.log(i)[-2500:] for i in range(len(workers.procs)))


# -- (a) a worker's pool process SIGKILLed mid-upload ----------------------------------------------

@pytest.mark.slow
def test_worker_sigkilled_mid_upload(farm, fixtures, own_redis, payload, tmp_path):
    """The only pool process of a worker is SIGKILLed while the registry holds an upload of
    it open with bytes received (the payload or a base layer crossing registries): the task
    comes back through the broker (same task id, a second delivery marked redelivered),
    the cut upload never completes, every base ends with one tag."""
    target, to, env, workers = farm
    bases = _bases(fixtures, 12)
    w = workers.start("derive", concurrency=1, name="w0")
    lockfile = tmp_path / "lock.json"
    proc = _prebuild(env, _dataset(tmp_path, bases), lockfile)
    try:
        # a worker's upload: the driver publishes the payload itself before its tasks (#16)
        cut = wait_for(lambda: open_uploads(target, skip=PAYLOAD_REPO) or proc.poll() is not None,
                       "an upload with bytes in it")
        assert proc.poll() is None, "the batch ended before an upload was seen: " + proc.stderr.read()[-3000:]
        [pid] = workers.pool(w)
        running = [tid for tid, r in task_records(own_redis.url).items() if r.get("pid") == str(pid)]
        os.kill(pid, signal.SIGKILL)
        cleared = time.time()
    except BaseException:
        proc.kill()
        raise
    state, _ = _finish(proc, lambda: _logs(workers))
    ev = Evidence.read(target, to)
    assert not (cut & ev.finished_uploads), "the kill did not cut the upload: it completed"
    assert_batch_complete(target, lockfile, bases, to)
    ev.check(lockfile, bases)
    records = task_records(own_redis.url)
    counts = deliveries(records)
    assert len(running) == 1, running
    killed = records[running[0]]
    assert int(killed["deliveries"]) == 2 + int(killed["retries"]) and killed["redelivered"] == "1", killed
    assert counts["tasks"] == len(bases)  # one task per base: nothing came from a driver resubmit
    assert state["resubmitted"] == 0 and state["redelivered"] == 1 and state["failed"] == 0, state
    row("pool process SIGKILLed mid-upload (Celery, 1 process)", len(bases), 0, ev, counts, state, cleared,
        f"pytest -s {HERE}::test_worker_sigkilled_mid_upload")


# -- (b) the registry SIGKILLed mid-upload and started again -----------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "celery"])
def test_registry_killed_mid_upload(farm, fixtures, own_redis, payload, tmp_path, executor):
    target, to, env, workers = farm
    bases = _bases(fixtures, 16)
    if executor == "celery":
        workers.start("derive", concurrency=2, name="w0")
    lockfile = tmp_path / "lock.json"
    proc = _prebuild(env, _dataset(tmp_path, bases), lockfile, executor)
    try:
        cut = wait_for(lambda: open_uploads(target) or proc.poll() is not None, "an upload with bytes in it")
        assert proc.poll() is None, "the batch ended before an upload was seen: " + proc.stderr.read()[-3000:]
        target.kill()
        target.start()
        cleared = time.time()
    except BaseException:
        proc.kill()
        raise
    state, _ = _finish(proc, lambda: _logs(workers))
    ev = Evidence.read(target, to)
    assert not (cut & ev.finished_uploads), "the kill did not cut the upload: it completed"
    assert_batch_complete(target, lockfile, bases, to)
    ev.check(lockfile, bases)
    assert state["failed"] == 0 and state["resubmitted"] == 0, state
    counts = deliveries(task_records(own_redis.url)) if executor == "celery" else {}
    if executor == "celery":
        assert counts["tasks"] == len(bases)
    row(f"registry SIGKILLed mid-upload and restarted ({executor})", len(bases), 0, ev, counts, state, cleared,
        f"pytest -s '{HERE}::test_registry_killed_mid_upload[{executor}]'")
    again, _ = _finish(_prebuild(env, _dataset(tmp_path, bases), lockfile, executor))
    assert again["skipped"] == len(bases) and again["derived"] == 0, again
    assert Evidence.read(target, to).tag_puts == ev.tag_puts  # the rerun put nothing


# -- (c) Redis SIGKILLed over several rounds and outage lengths ------------------------------------------

def redis_rounds(farm, fixtures, own_redis, tmp_path, outages: list[float], n_bases: int, verify: int,
                 name: str) -> None:
    target, to, env, workers = farm
    bases = _bases(fixtures, n_bases)
    workers.start("derive,verify", concurrency=2, name="w0")
    workers.start("derive", concurrency=1, name="w1")
    lockfile = tmp_path / "lock.json"
    proc = _prebuild(env, _dataset(tmp_path, bases), lockfile, verify=str(verify))
    marks = []
    try:
        for k, outage in enumerate(outages):
            goal = n_bases * (k + 1) // (len(outages) + 1)
            got = wait_for(lambda: proc.poll() is not None or (_tag_puts(target, to) >= goal and goal),
                           f"{goal} images tagged before round {k + 1}")
            assert proc.poll() is None and got, "the batch ended before the fault: " + proc.stderr.read()[-3000:]
            done = _tag_puts(target, to)
            queued = redis.Redis.from_url(own_redis.url).llen("derive")
            own_redis.kill()
            time.sleep(outage)
            own_redis.start()
            requeued = redis.Redis.from_url(own_redis.url).llen("derive")
            marks.append((done, queued, requeued))
            # the queue outlived the SIGKILL (appendonly): at most what workers took meanwhile is gone from it
            assert requeued >= queued - 3, (queued, requeued)
        cleared = time.time()
    except BaseException:
        proc.kill()
        raise
    state, err = _finish(proc, lambda: _logs(workers))
    ev = Evidence.read(target, to)
    assert all(done < n_bases for done, _, _ in marks), marks  # every round landed mid-batch
    sample = {e.base for e in Lockfile.read(lockfile).entries if e.verified}
    assert len(sample) == verify, sample
    assert_batch_complete(target, lockfile, bases, to)
    ev.check(lockfile, bases, sample)
    counts = deliveries(task_records(own_redis.url))
    assert counts["tasks"] == n_bases + verify  # one task per derive and verify: no driver resubmit
    assert state["failed"] == 0 and state["verify_failed"] == 0, state["failures"]
    assert state["resubmitted"] == 0 and "asking again" not in err, err[-3000:]
    # no task waits out a long countdown after the last fault (retries back off to 30 s at
    # most, the gate waits Redis out)
    assert_no_long_countdown(task_records(own_redis.url), cleared)
    # the workers (their supervisors) are all still there, and serving
    assert all(p.poll() is None for p in workers.procs), _logs(workers)
    rounds = ", ".join(f"{o:.0f} s" for o in outages)
    row(f"Redis SIGKILLed {len(outages)}x mid-batch, outages {rounds} (Celery, 2 workers, {verify} boot-checked)",
        n_bases, 0, ev, counts, state, cleared, name)
    print(f"rounds (tagged before, queued before kill, queued after restart): {marks}")


@pytest.mark.slow
def test_redis_sigkilled_rounds(farm, fixtures, own_redis, payload, tmp_path):
    """Three SIGKILLs of Redis (3, 8, 20 s down), each once a further quarter of the
    bases is tagged. Longer outages are run by hand, with the outages in FAULT_OUTAGES:
    ``FAULT_OUTAGES=120 pytest -s tests/reliability/test_faults.py::test_redis_sigkilled_rounds``."""
    outages = [float(x) for x in os.environ.get("FAULT_OUTAGES", "3,8,20").split(",")]
    env = "" if "FAULT_OUTAGES" not in os.environ else f"FAULT_OUTAGES={os.environ['FAULT_OUTAGES']} "
    redis_rounds(farm, fixtures, own_redis, tmp_path, outages, 6 * (len(outages) + 1), 1,
                 f"{env}pytest -s {HERE}::test_redis_sigkilled_rounds")


# -- no worker on the queue -------------------------------------------------------------------------

@pytest.mark.slow
def test_no_consumer_is_named_then_batch_finishes(farm, fixtures, payload, tmp_path):
    """Nothing consumes ``derive``: the driver says so, naming the queue and the command
    that starts a worker, and does not ask again; once a worker starts, the batch ends."""
    target, to, env, workers = farm
    bases = _bases(fixtures, 4)
    lockfile = tmp_path / "lock.json"
    workers.start("verify", concurrency=1, name="w0")  # a worker, but not on the queue that matters
    proc = _prebuild(env, _dataset(tmp_path, bases), lockfile)
    lines: list[str] = []
    def read() -> None:
        for line in proc.stderr:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: proc.poll() is not None or any("no worker consumes queue 'derive'" in x for x in lines),
                 "the driver to name the queue without a worker", timeout=90)
        text = "".join(lines)
        assert proc.poll() is None, text[-3000:]
        assert "imagefarm worker --queues derive" in text and "asking again" not in text, text[-3000:]
        workers.start("derive", concurrency=1, name="w1")
        assert proc.wait(300) == 0, "".join(lines)[-3000:] + _logs(workers)
    except BaseException:
        proc.kill()
        raise
    reader.join(10)
    state = json.loads(proc.stdout.read())
    assert state["derived"] == len(bases) and state["resubmitted"] == 0, state
    Evidence.read(target, to).check(lockfile, bases)


# -- the disk fills up ------------------------------------------------------------------------

@pytest.fixture
def tiny_cache(tmp_path, settings, payload):
    """A cache dir on a 48 MiB tmpfs whose payload tree (the step before the layer) is
    the real, already-built one: building the payload then means writing its ~220 MB
    layer onto a disk that cannot hold it."""
    from imagefarm.payload import payload_dir
    from imagefarm.payload.recipe import recipe_for

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0755", "tmpfs", str(mnt)], check=True)
    try:
        recipe = recipe_for(settings)
        real_trees = payload_dir(settings) / "trees"
        tree = real_trees / recipe.tree_digest.split(":", 1)[1][:24]
        assert (tree / ".imagefarm-complete").exists(), "the payload fixture leaves a complete tree"
        (mnt / "payload").mkdir()
        (mnt / "payload" / "trees").symlink_to(real_trees)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_payload_build(tiny_cache, settings, cli_env):
    env = {**cli_env, "IMAGEFARM_CACHE_DIR": str(tiny_cache)}
    proc = imagefarm_cli("payload", "build", env=env, timeout=900)
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    # the message says what ran out and where
    assert "space" in errors[0].lower() and str(tiny_cache) in err, err[-2000:]
    # no half-written blob, no record of a payload that does not exist
    blobs = tiny_cache / "payload" / "blobs"
    left = sorted(p.name for p in blobs.iterdir()) if blobs.exists() else []
    assert left == [], left
    assert not list((tiny_cache / "payload").glob("*.json")) and not list((tiny_cache / "payload").glob("*.tmp"))
    st = os.statvfs(tiny_cache)
    assert st.f_bfree * st.f_frsize > 40 * 1024 * 1024  # the space was given back
    # the cache does not claim a payload: the next build starts clean, nothing to fix by hand
    from imagefarm.payload import load_payload
    from imagefarm.payload.recipe import recipe_for

    assert load_payload(settings.model_copy(update={"cache_dir": tiny_cache}), recipe_for(settings)) is None


# -- (a') a pool process SIGKILLed, then Redis SIGKILLed before the task came back -----------------

@pytest.mark.slow
@pytest.mark.parametrize("when", ["before-requeue", "after-requeue"])
def test_worker_sigkilled_then_redis_killed(farm, fixtures, own_redis, payload, tmp_path, when):
    """The pool process holding a task is SIGKILLed mid-upload, then Redis is SIGKILLed
    too (down 10 s). Celery requeues a lost process's task only after billiard's 10 s
    ``worker_lost_wait``: killed at once (``before-requeue``), Redis is down when that
    reject is sent, and the task must come back by the sweep of expired leases; killed
    once the message is back on its queue (``after-requeue``, read there), the requeued
    message must survive the restart (appendonly). Either way it comes back through the
    broker (a second delivery, marked redelivered; no driver resubmit), and no task is
    set to wait past 60 s after Redis's return."""
    target, to, env, workers = farm
    bases = _bases(fixtures, 16)
    w = workers.start("derive", concurrency=1, name="w0")
    lockfile = tmp_path / "lock.json"
    proc = _prebuild(env, _dataset(tmp_path, bases), lockfile)
    try:
        cut = wait_for(lambda: open_uploads(target, skip=PAYLOAD_REPO) or proc.poll() is not None,
                       "an upload with bytes in it")
        assert proc.poll() is None, "the batch ended before an upload was seen: " + proc.stderr.read()[-3000:]
        [pid] = workers.pool(w)
        running = [tid for tid, r in task_records(own_redis.url).items() if r.get("pid") == str(pid)]
        assert len(running) == 1, running
        os.kill(pid, signal.SIGKILL)
        if when == "after-requeue":
            broker = redis.Redis.from_url(own_redis.url)
            wait_for(lambda: proc.poll() is not None or any(
                json.loads(m)["headers"]["id"] == running[0] for m in broker.lrange("derive", 0, -1)),
                "the killed task's message back on its queue", timeout=120)
            assert proc.poll() is None, "the batch ended before the requeue was seen"
        own_redis.kill()
        time.sleep(10)
        own_redis.start()
        cleared = time.time()
    except BaseException:
        proc.kill()
        raise
    state, err = _finish(proc, lambda: _logs(workers))
    ev = Evidence.read(target, to)
    assert not (cut & ev.finished_uploads), "the kill did not cut the upload: it completed"
    assert_batch_complete(target, lockfile, bases, to)
    ev.check(lockfile, bases)
    records = task_records(own_redis.url)
    counts = deliveries(records)
    killed = records[running[0]]
    assert int(killed["deliveries"]) >= 2 and killed["redelivered"] == "1", killed
    assert counts["tasks"] == len(bases)  # one task per base: nothing came from a driver resubmit
    assert state["resubmitted"] == 0 and "asking again" not in err and state["failed"] == 0, (state, err[-3000:])
    assert_no_long_countdown(records, cleared)
    row(f"pool process SIGKILLed mid-upload, then Redis SIGKILLed {when} for 10 s (Celery, 1 process)",
        len(bases), 0, ev, counts, state, cleared,
        f"pytest -s '{HERE}::test_worker_sigkilled_then_redis_killed[{when}]'")
