"""The farm end to end: real Celery workers on real Redis, the fixture registry, the
real payload; derive all, verify a sample, lockfile, no work on a second run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx
import pytest

from imagefarm.farm.lockfile import Lockfile
from imagefarm.names.reference import parse
from tests.conftest import IMAGEFARM, imagefarm_cli


def _run_prebuild(env, dataset, to, lockfile, executor, verify="2"):
    return imagefarm_cli("prebuild", "--dataset", str(dataset), "--to", to, "--executor", executor,
                         "--lockfile", str(lockfile), "--verify", verify, "--json", env=env, timeout=1200)


def _check_lockfile(path, farm_bases, to, n_verified):
    lock = Lockfile.read(path)
    assert {e.base for e in lock.entries} == set(farm_bases)
    assert len(lock.entries) == len(farm_bases)  # the duplicate row collapsed, the bad row skipped
    for e in lock.entries:
        assert e.image.startswith(to + "/namanjain12/")
        assert e.image_digest.startswith("sha256:") and e.base_digest.startswith("sha256:")
        assert e.pinned == f"{parse(e.image).name}@{e.image_digest}"
        assert e.recipe == "default" and e.agent_server_version
    assert sum(e.verified for e in lock.entries) == n_verified
    return lock


def _assert_registry_complete(registry, to, lock):
    """Every tag is a whole manifest whose blobs all exist (no half-written tag)."""
    accept = "application/vnd.oci.image.manifest.v1+json"
    for e in lock.entries:
        ref = parse(e.image)
        r = httpx.get(f"{registry.url}/v2/{ref.repository}/manifests/{ref.tag}", headers={"Accept": accept})
        assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == e.image_digest
        m = r.json()
        for d in [m["config"], *m["layers"]]:
            assert httpx.head(f"{registry.url}/v2/{ref.repository}/blobs/{d['digest']}").status_code == 200


@pytest.mark.slow
def test_celery_farm_end_to_end(cli_env, dataset, farm_bases, registry, workers, payload, tmp_path):
    to = f"{registry.host}/farm-celery"
    workers.start("derive", concurrency=2)
    workers.start("verify", concurrency=1)
    lockfile = tmp_path / "lock.json"
    first = _run_prebuild(cli_env, dataset, to, lockfile, "celery")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    state = json.loads(first.stdout)
    assert state["total"] == len(farm_bases) and state["derived"] == len(farm_bases) and state["failed"] == 0
    assert state["verified"] == 2 and state["bad_rows"] == 1
    assert "Not A Valid Ref" in first.stderr  # the bad row is reported with its row number
    lock = _check_lockfile(lockfile, farm_bases, to, 2)
    _assert_registry_complete(registry, to, lock)

    second = _run_prebuild(cli_env, dataset, to, lockfile, "celery")
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads(second.stdout)
    assert again["derived"] == 0 and again["skipped"] == len(farm_bases)  # nothing redone
    assert Lockfile.read(lockfile).entries == lock.entries
    status = imagefarm_cli("status", "--json", env=cli_env)
    assert json.loads(status.stdout)["status"] == "finished"


@pytest.mark.slow
def test_local_executor_same_scenario(cli_env, dataset, farm_bases, registry, payload, tmp_path):
    to = f"{registry.host}/farm-local"
    lockfile = tmp_path / "lock.json"
    first = _run_prebuild(cli_env, dataset, to, lockfile, "local")
    assert first.returncode == 0, first.stderr[-3000:]
    state = json.loads(first.stdout)
    assert state["derived"] == len(farm_bases) and state["verified"] == 2 and state["failed"] == 0
    lock = _check_lockfile(lockfile, farm_bases, to, 2)
    _assert_registry_complete(registry, to, lock)
    second = _run_prebuild(cli_env, dataset, to, lockfile, "local")
    assert json.loads(second.stdout)["derived"] == 0


def test_failures_are_reported_not_fatal(cli_env, fixtures, registry, payload, tmp_path):
    good = fixtures.r2e_base("namanjain12/pillow_final", "5" * 40).ref
    missing = f"{registry.host}/namanjain12/pillow_final:{'6' * 40}"
    ds = tmp_path / "list.txt"
    ds.write_text(f"{good}\n{missing}\n")
    proc = imagefarm_cli("prebuild", "--dataset", str(ds), "--to", f"{registry.host}/farm-fail",
                         "--verify", "none", env=cli_env, timeout=600)
    assert proc.returncode == 1
    assert "derived 1" in proc.stdout and "failed 1" in proc.stdout
    assert "failures" in proc.stdout and "pillow_final" in proc.stdout and "not found" in proc.stdout.lower()


@pytest.mark.slow
def test_worker_killed_mid_task(cli_env, fixtures, registry, workers, payload, tmp_path):
    """SIGKILL a worker's pool process while it derives: the task is redelivered and
    every image ends up built exactly once, with no half-written tag."""
    from imagefarm.host.services import Registry

    with Registry.create() as target:
        to = f"{target.host}/farm-kill"  # another registry: each derive copies base blobs (slow enough to hit)
        bases = [b.ref for b in fixtures.r2e_set(6)]
        ds = tmp_path / "list.txt"
        ds.write_text("\n".join(bases) + "\n")
        w = workers.start("derive", concurrency=1)
        driver = subprocess.Popen(
            [IMAGEFARM, "prebuild", "--dataset", str(ds), "--to", to,
             "--executor", "celery", "--verify", "none", "--json", "--lockfile", str(tmp_path / "l.json")],
            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        killed = False
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if "Task imagefarm.derive" in workers.log(0) and "received" in workers.log(0):
                for child in workers.children(w):
                    os.kill(child, signal.SIGKILL)
                    killed = True
            time.sleep(0.05)
        assert killed, "never saw the worker take a task"
        out, err = driver.communicate(timeout=600)
        assert driver.returncode == 0, err[-3000:] + workers.log(0)[-3000:]
        state = json.loads(out)
        assert state["failed"] == 0 and state["derived"] + state["skipped"] == len(bases)
        lock = Lockfile.read(tmp_path / "l.json")
        assert len(lock.entries) == len(bases)
        # exactly once: one tag per base in the target, each a complete manifest
        for repo in {parse(e.image).repository for e in lock.entries}:
            tags = httpx.get(f"{target.url}/v2/{repo}/tags/list").json()["tags"]
            mine = [e for e in lock.entries if parse(e.image).repository == repo]
            assert sorted(tags) == sorted(parse(e.image).tag for e in mine)
        _assert_registry_complete(target, to, lock)
        assert "WorkerLostError" in workers.log(0) or "SIGKILL" in workers.log(0)


@pytest.mark.slow
def test_image_that_does_not_boot_is_never_published(cli_env, fixtures, registry, tmp_path):
    """tests/recipes/broken.toml's server dies at import: verify fails with the reason, the
    image is pushed by digest only (no tag), so neither lookup nor a runtime serves it."""
    base = fixtures.r2e_base("namanjain12/pillow_final", "b" * 40).ref
    ds = tmp_path / "one.txt"
    ds.write_text(base + "\n")
    to = f"{registry.host}/farm-broken"
    lockfile = tmp_path / "lock.json"
    proc = imagefarm_cli("prebuild", "--dataset", str(ds), "--to", to, "--recipe", "broken", "--verify", "all",
                         "--lockfile", str(lockfile), "--json", env=cli_env, timeout=1200)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    state = json.loads(proc.stdout)
    assert state["derived"] == 1 and state["verify_failed"] == 1 and state["verified"] == 0
    assert "crash" in state["failures"][0]["reason"] and state["failures"][0]["stage"] == "verify"
    entry = Lockfile.read(lockfile).entries[0]
    assert not entry.verified
    ref = parse(entry.image)
    tags = httpx.get(f"{registry.url}/v2/{ref.repository}/tags/list").json().get("tags") or []
    assert ref.tag not in tags  # never published
    by_digest = httpx.head(f"{registry.url}/v2/{ref.repository}/manifests/{entry.image_digest}",
                           headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert by_digest.status_code == 200  # but kept by digest, for a look at what failed
    miss = imagefarm_cli("lookup", base, "--to", to, "--recipe", "broken", env=cli_env)
    assert miss.returncode == 1 and "no prebuilt image" in miss.stderr
