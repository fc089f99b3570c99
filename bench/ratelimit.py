"""A batch from a rate-limited public registry: ``--plan`` against what the run moves.

Registry A holds the bases; in front of it the Docker-Hub-like stand-in
(``imagefarm.testing.ratelimited``: manifest GETs counted per window, 429 past the
budget, HEAD free) plays the public registry. (1) ``make_plan`` on the dataset, then
``run_batch`` into an empty registry B: planned layer bytes and counted requests vs
what the stand-in's own log says the run took, and what B's access log says landed.
(2) The same batch with no plan first (fresh state dir, empty registry C): the run
spends the budget itself and waits out the windows; how long, how many 429s, failures.
"""

from __future__ import annotations

import time
from typing import Any

from imagefarm.names.reference import parse
from imagefarm.registry import RegistryClient, ratelimit
from imagefarm.testing.ratelimited import RateLimitedRegistry

from .context import Bench
from .machine import loadavg

LIMIT, WINDOW = 10, 10.0


def _layer_digests(b: Bench, refs: list[str]) -> set[str]:
    with RegistryClient(b.settings()) as c:
        return {d.digest for r in refs for d in c.resolve(parse(r)).manifest.layers}


def _taken(hub: RateLimitedRegistry, since: int, layers: set[str]) -> dict[str, Any]:
    hits = hub.log[since:]
    return {
        "layer_bytes": sum(h.sent for h in hits if h.method == "GET" and h.status == 200 and "/blobs/" in h.path
                           and h.path.rsplit("/", 1)[1] in layers),
        "layers": len({h.path for h in hits if h.method == "GET" and h.status == 200 and "/blobs/" in h.path
                       and h.path.rsplit("/", 1)[1] in layers}),
        "pulls": sum(h.counted for h in hits), "refused_429": sum(h.status == 429 for h in hits),
        "heads": sum(h.method == "HEAD" for h in hits), "requests": len(hits),
        "pauses": sum(1 for h in hits if h.counted and h.remaining == 0),
    }


def _batch(b: Bench, dataset: str, to: str, state: str | None = None):
    from imagefarm.farm.prebuild import run_batch

    from imagefarm.settings import Settings

    settings = Settings.load(state_dir=b.work / state, to=to) if state else b.settings(to=to)
    old = ratelimit.install(ratelimit.LocalGate())  # a new batch process starts with a fresh gate
    try:
        t0 = time.perf_counter()
        res = run_batch(settings, dataset, executor="local", verify="none", workers=8)
        return res.state, time.perf_counter() - t0
    finally:
        ratelimit.install(old)


def run_ratelimit(b: Bench) -> dict[str, Any]:
    from imagefarm.farm.plan import make_plan

    src = b.registry()
    real = [f.ref for f in b.realistic_set()[:b.plan.copy_bases]]
    small = b.small_set()[:40]
    _ = b.payload  # built (or cached) before anything is timed
    hub = RateLimitedRegistry(src.url, limit=LIMIT, window=WINDOW).start()
    b.stack.callback(hub.close)
    refs = [r.replace(src.host, hub.host) for r in real + small]
    layers = _layer_digests(b, real + small)
    dataset = str(b.dataset_file(refs, "ratelimit-bases.txt"))
    load0 = loadavg()
    b.log(f"ratelimit: {len(refs)} bases behind a stand-in allowing {LIMIT} manifest GETs per {WINDOW:g}s")

    # (1) plan, then the run into an empty registry B
    dst = b.registry("rl-b")
    to = f"{dst.host}/prebuilt"
    old = ratelimit.install(ratelimit.LocalGate())
    try:
        t0 = time.perf_counter()
        plan = make_plan(b.settings(to=to), dataset, bandwidth=125e6)
        plan_s = time.perf_counter() - t0
    finally:
        ratelimit.install(old)
    src_plan = plan.sources[hub.host]
    planned_pulls_log = _taken(hub, 0, layers)
    b.log(f"  plan in {plan_s:.1f}s: {src_plan.layers} layers, {src_plan.layer_bytes / 1e6:.1f} MB, "
          f"{src_plan.pulls_spent} pulls")
    mark_hub, mark_dst = len(hub.log), dst.mark()
    state, run_s = _batch(b, dataset, to)
    took = _taken(hub, mark_hub, layers)
    landed = dst.traffic(mark_dst)
    b.log(f"  run in {run_s:.1f}s: {took['layer_bytes'] / 1e6:.1f} MB of layers, {took['pulls']} pulls, "
          f"derived {state.derived}, failed {state.failed}")

    # (2) no plan first: the run spends the budget itself
    dst2 = b.registry("rl-c")
    mark_hub2 = len(hub.log)
    time.sleep(WINDOW)  # the stand-in's window is whole again: both runs start alike
    state2, run2_s = _batch(b, dataset, f"{dst2.host}/prebuilt", state="state-noplan")
    took2 = _taken(hub, mark_hub2, layers)
    b.log(f"  run without plan in {run2_s:.1f}s: {took2['pulls']} pulls, {took2['refused_429']} refused, "
          f"{took2['pauses']} pauses, failed {state2.failed}")
    return {
        "bases": len(refs), "realistic": len(real), "small": len(small), "limit": LIMIT, "window": WINDOW,
        "plan": {"seconds": plan_s, "layers": src_plan.layers, "layer_bytes": src_plan.layer_bytes,
                 "pulls": src_plan.pulls_spent, "pulls_in_log": planned_pulls_log["pulls"],
                 "heads_in_log": planned_pulls_log["heads"], "payload_bytes": plan.payload_bytes,
                 "estimate_s": plan.seconds, "bandwidth": plan.bandwidth, "done": len(plan.done),
                 "to_derive": len(plan.to_derive)},
        "run": {"seconds": run_s, **took, "pushed_bytes": landed["pushed_bytes"], "derived": state.derived,
                "failed": state.failed},
        "run_without_plan": {"seconds": run2_s, **took2, "derived": state2.derived, "failed": state2.failed,
                             "min_seconds_by_budget": (len(refs) - 1) // LIMIT * WINDOW},
        "loadavg": [load0, loadavg()],
    }
