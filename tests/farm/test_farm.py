"""The farm end to end: real Celery workers on real Redis, the fixture registry, the
real payload; derive all, verify a sample, lockfile, no work on a second run."""

from __future__ import annotations

import json
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
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_driver_killed_then_run_again(cli_env, fixtures, payload, tmp_path, sig):
    """The prebuild driver (local pool) is killed mid-batch and the same command is run
    again: the rerun finishes the batch and redoes nothing finished -- each tag put once
    over both runs, no completed blob upload repeated (the registry's access log) -- and
    the lockfile is complete. SIGTERM is an orderly stop (exit 130, lockfile of what was
    done); SIGKILL leaves the batch "interrupted" in ``imagefarm status``."""
    from imagefarm.host.services import Registry
    from tests.reliability.evidence import Evidence

    bases = [b.ref for b in fixtures.r2e_set(16)]
    ds = tmp_path / "list.txt"
    ds.write_text("\n".join(bases) + "\n")
    lockfile = tmp_path / "lock.json"
    with Registry.create(access_log=True) as target:
        to = f"{target.host}/driver-kill"
        env = {**cli_env, "IMAGEFARM_TO": to}
        argv = [IMAGEFARM, "prebuild", "--dataset", str(ds), "--verify", "none", "--workers", "2", "--json",
                "--lockfile", str(lockfile)]
        driver = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            if sum(Evidence.read(target, to).tag_puts.values()) >= 3:
                break
            time.sleep(0.05)
        assert driver.poll() is None, "the batch ended before the kill: " + driver.stderr.read()[-3000:]
        driver.send_signal(sig)
        out, err = driver.communicate(timeout=120)
        mark = target.mark()
        before = Evidence.read(target, to)
        done_before = sum(before.tag_puts.values())
        assert 3 <= done_before < len(bases), done_before
        status = json.loads(imagefarm_cli("status", "--json", env=env).stdout)
        assert status["status"] == "interrupted", status
        if sig == signal.SIGTERM:
            assert driver.returncode == 130 and "run the same command again" in err, (driver.returncode, err[-2000:])
            partial = Lockfile.read(lockfile)  # what was finished is pinned already
            assert {parse(e.image).tag for e in partial.entries} <= {t for _, t in before.tag_puts}
        else:
            assert driver.returncode == -signal.SIGKILL

        again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        state = json.loads(again.stdout)
        assert state["failed"] == 0 and state["skipped"] >= done_before, state
        assert state["derived"] + state["skipped"] == len(bases), state
        ev = Evidence.read(target, to)
        ev.check(lockfile, bases)  # each base tagged exactly once over both runs, lockfile complete
        lock = Lockfile.read(lockfile)
        _assert_registry_complete(target, to, lock)
        # nothing finished was done again: no blob of an image tagged before the kill was
        # uploaded after it (an unfinished derive may upload its small config again)
        finished = {(parse(e.image).repository, parse(e.image).tag) for e in lock.entries} & set(before.tag_puts)
        blobs = set()
        for repo, tag in finished:
            m = httpx.get(f"{target.url}/v2/{repo}/manifests/{tag}",
                          headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
            blobs |= {(repo, d["digest"]) for d in [m["config"], *m["layers"]]}
        redone = set(Evidence.read(target, to, mark).uploads) & blobs
        assert not redone, redone
        print(f"\ndriver {sig.name}: {done_before}/{len(bases)} tagged before the kill, rerun derived "
              f"{state['derived']} and skipped {state['skipped']}; tag PUTs beyond one 0, uploads cut and redone "
              f"{ev.abandoned_uploads}, completed uploads repeated {ev.repeated_uploads}")


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
