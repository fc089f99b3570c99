"""Section: ``run_batch`` over the same bases through the local pool and through Celery."""

from __future__ import annotations

from typing import Any

from ..fmt import TARGET_SUBSET_S, load, ok, sec
from . import Context, Section


def body(fa: dict[str, Any], ctx: Context) -> list[str]:
    """The farm: run_batch with the local pool and with Celery."""
    L: list[str] = []
    w = L.append
    w(f"`imagefarm.farm.prebuild.run_batch` over the same {fa['bases']} bases (`verify=\"none\"`), timed from the "
      "call to its return (driver, task submission, result polling included), each run into a fresh prefix. "
      "Celery: real `redis-server`, real worker processes (`celery -A imagefarm.worker.app worker -Q derive "
      "--concurrency N`, prefork); worker start-up not included.")
    w("")
    w("| executor | images | derived / failed | wall | images/s | worker ready in | load avg |")
    w("|---|---|---|---|---|---|---|")
    for r in fa["runs"]:
        name = (f"Celery, {r['workers']} worker process(es)" if r["executor"] == "celery"
                else f"local pool, {r['workers']} threads")
        w(f"| {name} | {r['images']} | {r['derived']} / {r['failed']} | {sec(r['seconds'])} | "
          f"{r['images_per_s']:.1f} | {sec(r.get('worker_ready_s'))} | {load(r['loadavg'])} |")
    w("")
    if fa.get("full"):
        full = fa["full"]
        w(f"**At full size**, the same run: all {full['bases']:,} bases (R2E-Gym-Subset's size; the first "
          f"{fa['bases']} are the set above), each executor into a fresh prefix. The driver reads Celery results "
          "in sweeps (one `MGET` of every pending result key per 0.1 s), not one request per task.")
        w("")
        w("| executor | images | derived / failed | wall | images/s | load avg |")
        w("|---|---|---|---|---|---|")
        for r in full["runs"]:
            name = (f"Celery, {r['workers']} worker process(es)" if r["executor"] == "celery"
                    else f"local pool, {r['workers']} threads")
            w(f"| {name} | {r['images']:,} | {r['derived']:,} / {r['failed']} | {sec(r['seconds'])} | "
              f"{r['images_per_s']:.1f} | {load(r['loadavg'])} |")
        w("")
    fails = [f for r in fa["runs"] + (fa.get("full") or {}).get("runs", []) for f in r.get("failures", [])]
    if fails:
        w(f"First failures: {'; '.join(f['base'] + ': ' + f['reason'][:200] for f in fails[:3])}")
        w("")
    return L


def targets(ctx: Context) -> list[str]:
    """The whole subset through both executors; without it, extrapolated from ``scale``."""
    sc, full = ctx.res.get("scale"), (ctx.res.get("farm") or {}).get("full")
    if full:
        by = {r["executor"]: r for r in full["runs"]}
        cel, loc = by.get("celery"), by.get("local")
        return [f"| all {full['bases']:,} R2E-Gym-Subset bases (payload seeded in the prefix) | < 2 min through Celery as "
                f"through the local pool | Celery {sec(cel['seconds'])} ({cel['images_per_s']:.0f}/s, {cel['workers']} "
                f"worker processes); local pool {sec(loc['seconds'])} ({loc['images_per_s']:.0f}/s), same run | "
                f"{ok(cel['seconds'] < TARGET_SUBSET_S and loc['seconds'] < TARGET_SUBSET_S and not cel['failed'])} |"]
    if sc:
        return [f"| all 4,578 R2E-Gym-Subset bases | < 2 min | {sc['r2e_subset_extrapolated_s']:.0f} s "
                f"(extrapolated from {sc['bases']} bases at the best rate) | "
                f"{ok(sc['r2e_subset_extrapolated_s'] < TARGET_SUBSET_S)} |"]
    return []


def tail(ctx: Context) -> list[str]:
    """The throughput plot closes the scale and farm figures."""
    return ["![throughput](bench/throughput.png)", ""] if ctx.res.get("scale") or ctx.res.get("farm") else []


SECTION = Section(
    "farm",
    1.6,
    body,
    targets=targets,
    target_order=2,
    tail=tail,
)
