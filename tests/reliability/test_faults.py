"""Faults injected into real services while a batch runs: the registry restarted
mid-derive (local pool and Celery), Redis restarted mid-batch, the disk filling up
during a payload build. "Worker killed mid-derive" is tests/farm/test_farm.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import imagefarm_cli
from tests.reliability.conftest import assert_batch_complete, catalog_tags, uploads_in_flight, wait_for

N_BASES = 20


def _dataset(tmp_path: Path, bases: list[str]) -> Path:
    path = tmp_path / "bases.txt"
    path.write_text("\n".join(bases) + "\n")
    return path


def _start_prebuild(env, dataset: Path, to: str, lockfile: Path, executor: str) -> subprocess.Popen:
    exe = str(Path(sys.executable).parent / "imagefarm")
    return subprocess.Popen([exe, "prebuild", "--dataset", str(dataset), "--to", to, "--executor", executor,
                             "--verify", "none", "--verify-timeout", "30", "--json", "--lockfile", str(lockfile)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, extra: str = "") -> dict:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{err[-4000:]}\n{out[-2000:]}\n{extra}"
    return json.loads(out)


def _registry_restart_batch(cli_env, fixtures, target, payload, tmp_path, executor, workers=None):
    """Prebuild N bases from the session registry into ``target``; restart ``target``
    while a derive is uploading to it; the batch must complete with nothing lost or doubled."""
    bases = [b.ref for b in fixtures.r2e_set(N_BASES)]
    to = f"{target.host}/rel-{executor}"
    env = {**cli_env, "IMAGEFARM_TO": to}
    if workers is not None:
        workers.start("derive", concurrency=2, name="w0")
    lockfile = tmp_path / "lock.json"
    proc = _start_prebuild(env, _dataset(tmp_path, bases), to, lockfile, executor)
    try:
        # mid-batch, by construction: bytes of a blob upload are in the registry and
        # no derive can finish before its blobs are in
        wait_for(lambda: uploads_in_flight(target) or proc.poll() is not None, "a blob upload into the target")
        assert proc.poll() is None, "the batch ended before any upload was seen: " + proc.stderr.read()[-3000:]
        done_before = sum(len(t) for r, t in catalog_tags(target).items() if "imagefarm-payload" not in r)
        target.restart()
    except BaseException:
        proc.kill()
        raise
    state = _finish(proc, workers.log(0)[-3000:] if workers else "")
    assert done_before < N_BASES
    assert state["failed"] == 0 and state["derived"] + state["skipped"] == N_BASES, state
    assert state["status"] == "finished"
    assert_batch_complete(target, lockfile, bases, to)
    # the rerun finds everything done: nothing half-written was taken for done or redone
    again = _finish(_start_prebuild(env, _dataset(tmp_path, bases), to, lockfile, executor))
    assert again["skipped"] == N_BASES and again["derived"] == 0 and again["failed"] == 0


@pytest.mark.slow
def test_registry_restarted_mid_batch_local(cli_env, fixtures, target, payload, tmp_path):
    _registry_restart_batch(cli_env, fixtures, target, payload, tmp_path, "local")


@pytest.mark.slow
def test_registry_restarted_mid_batch_celery(cli_env, fixtures, target, own_redis, payload, tmp_path,
                                             workers_for):
    env = {**cli_env, "IMAGEFARM_BROKER_URL": own_redis.url}
    _registry_restart_batch(env, fixtures, target, payload, tmp_path, "celery", workers_for(env))


@pytest.mark.slow
def test_redis_restarted_mid_batch_celery(cli_env, fixtures, target, own_redis, payload, tmp_path, workers_for,
                                          settings):
    """Restart Redis (broker and result backend) once the first image is published while
    the rest are queued or running: queued tasks survive (appendonly, fsync always), the
    workers and the driver reconnect, and the batch completes."""
    bases = [b.ref for b in fixtures.r2e_set(N_BASES)]
    to = f"{target.host}/rel-redis"
    env = {**cli_env, "IMAGEFARM_BROKER_URL": own_redis.url, "IMAGEFARM_TO": to}
    workers = workers_for(env)
    workers.start("derive", concurrency=1, name="w0")
    workers.start("derive", concurrency=1, name="w1")
    lockfile = tmp_path / "lock.json"
    proc = _start_prebuild(env, _dataset(tmp_path, bases), to, lockfile, "celery")

    def published() -> int:
        if proc.poll() is not None:
            return -1
        try:
            return sum(len(t) for r, t in catalog_tags(target).items() if "imagefarm-payload" not in r)
        except Exception:  # noqa: BLE001 - the catalog may be mid-write
            return 0

    try:
        n = wait_for(published, "the first published image")
        assert n > 0, "the batch ended before the fault: " + proc.stderr.read()[-3000:]
        assert n < N_BASES
        own_redis.restart()
    except BaseException:
        proc.kill()
        raise
    state = _finish(proc, workers.log(0)[-3000:] + workers.log(1)[-3000:])
    assert state["failed"] == 0 and state["derived"] + state["skipped"] == N_BASES, state
    assert_batch_complete(target, lockfile, bases, to)
    # the fault reached the workers, and they are still alive and serving after it
    logs = workers.log(0) + workers.log(1)
    assert "Connection to broker lost" in logs or "Cannot connect to redis" in logs, logs[-3000:]
    assert all(p.poll() is None for p in workers.procs)


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
