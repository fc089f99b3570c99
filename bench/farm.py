"""The farm: ``run_batch`` over the small set with Celery (1/2/4 worker processes on a
real Redis) and with the embedded local thread pool, each run into a fresh prefix; then
both again at full size (R2E-Gym-Subset's 4,578 bases) in the same run.

Timed from ``run_batch`` entry to its return (driver included: catalog, task
submission, result polling, state files); verification off (``verify="none"``) so the
figure is derive throughput. Worker start-up is reported separately.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from imagefarm.farm.prebuild import run_batch

from .context import Bench, python
from .machine import loadavg


def _wait_worker(app, node: str, timeout: float = 90.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            replies = app.control.ping(destination=[node], timeout=0.5) or []
        except Exception:  # noqa: BLE001 - broker not answering yet
            replies = []
        if any(node in r for r in replies):
            return time.monotonic() - t0
        time.sleep(0.2)
    raise RuntimeError(f"celery worker {node} did not answer ping within {timeout}s")


def _batch(b: Bench, bases: list[str], to: str, executor: str, workers: int = 8, **over: Any) -> dict[str, Any]:
    dataset = b.dataset_file(bases, f"dataset-{to.rsplit('/', 1)[-1]}.txt")
    settings = b.settings(to=to, **over)
    load0 = loadavg()
    t0 = time.perf_counter()
    res = run_batch(settings, str(dataset), executor=executor, verify="none", workers=workers)
    wall = time.perf_counter() - t0
    st = res.state
    done = st.derived + st.skipped  # a failed derive is not an image: it does not count towards the rate
    return {"images": st.total, "derived": st.derived, "skipped": st.skipped, "failed": st.failed,
            "failures": st.failures[:3], "seconds": wall, "images_per_s": done / wall,
            "loadavg": [load0, loadavg()]}


def _celery_run(b: Bench, app, redis, reg, bases: list[str], n: int, prefix: str) -> dict[str, Any]:
    b.seed_payload(reg, prefix)
    node = f"bench{n}-{len(bases)}@{socket.gethostname()}"
    b.log(f"farm: celery worker with {n} process(es) (prefork), {len(bases)} bases, prefix {prefix}")
    proc = b.spawn(f"celery-{n}-{len(bases)}", [python(), "-m", "celery", "-A", "imagefarm.worker.app", "worker",
                                               "-Q", "derive", "--concurrency", str(n), "-n", node,
                                               "--loglevel", "WARNING", "--without-gossip", "--without-mingle"],
                   env={"IMAGEFARM_BROKER_URL": redis.url, "IMAGEFARM_STATE_DIR": str(b.state_dir)})
    try:
        ready_s = _wait_worker(app, node)
        r = _batch(b, bases, f"{reg.host}/{prefix}", "celery", broker_url=redis.url)
    except Exception:
        b.log(b.log_tail(f"celery-{n}-{len(bases)}.log"))
        raise
    finally:
        b.stop_proc(proc)
    r.update(executor="celery", workers=n, worker_ready_s=ready_s)
    b.log(f"  {r['images_per_s']:.1f} images/s ({r['derived']} derived, {r['failed']} failed) in "
          f"{r['seconds']:.1f}s, worker ready in {ready_s:.1f}s")
    if r["failed"]:
        b.log(f"  first failure: {r['failures'][0]}")
    return r


def _local_run(b: Bench, reg, bases: list[str], prefix: str) -> dict[str, Any]:
    b.seed_payload(reg, prefix)
    b.log(f"farm: embedded local pool, {b.plan.local_workers} threads, {len(bases)} bases, prefix {prefix}")
    r = _batch(b, bases, f"{reg.host}/{prefix}", "local", workers=b.plan.local_workers)
    r.update(executor="local", workers=b.plan.local_workers)
    b.log(f"  {r['images_per_s']:.1f} images/s ({r['derived']} derived, {r['failed']} failed) in {r['seconds']:.1f}s")
    if r["failed"]:
        b.log(f"  first failure: {r['failures'][0]}")
    return r


def run_farm(b: Bench) -> dict[str, Any]:
    from imagefarm.worker.app import app

    reg = b.registry()
    bases = b.small_set()
    b.payload  # noqa: B018
    b.check_recipe_stable()  # the workers are fresh processes: they must derive with this payload
    redis = b.redis()
    app.conf.broker_url = app.conf.result_backend = redis.url
    runs = [_celery_run(b, app, redis, reg, bases, n, f"prebuilt-farm{n}") for n in b.plan.farm_workers]
    runs.append(_local_run(b, reg, bases, "prebuilt-farm-local"))
    # full size: the same two executors over every base of R2E-Gym-Subset's size, same run
    full = b.base_set(b.plan.farm_full_bases)
    n = b.plan.farm_full_workers
    full_runs = [_celery_run(b, app, redis, reg, full, n, f"prebuilt-full-celery{n}"),
                 _local_run(b, reg, full, "prebuilt-full-local")]
    return {"bases": len(bases), "runs": runs, "full": {"bases": len(full), "runs": full_runs}}
