"""Section: Lookups in process and over HTTP, against an empty FastAPI endpoint's floor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import plots
from ..fmt import TARGET_LOOKUP_P99_MS, TARGET_LOOKUP_RPS, load, ok, sec
from . import Context, Section


def body(lk: dict[str, Any], ctx: Context) -> list[str]:
    """Section 4: lookups in process and over HTTP."""
    L: list[str] = []
    w = L.append
    ip, hc, hw, ab = lk["in_process"], lk["http"]["cold"], lk["http"]["warm"], lk["http"].get("ab")
    w(f"{lk['bases']} bases with prebuilt images under `{lk['prefix'].split('/', 1)[1]}`. *In process*: "
      "`Lookup.resolve` in a loop, one thread. *HTTP*: the real service (`imagefarm serve-lookup`: FastAPI, "
      "uvicorn, one process, API key on) loaded by `bench.loadgen` in its own process (asyncio httpx clients, "
      "keep-alive). *Cold* = each base asked once of a fresh `Lookup` / freshly started service (tag list, "
      "manifest and verification-record reads against the registry); *warm* = the same bases asked again "
      f"for {ctx.results['plan']['lookup_seconds']:g} s. Client and server share the {ctx.machine['cores']} cores.")
    w("")
    w("| lookup | requests | per second | p50 | p99 | max | errors / non-200 |")
    w("|---|---|---|---|---|---|---|")
    w(f"| in process, warm | {ip['warm']['requests']:,} | {ip['warm']['rps']:,.0f} | "
      f"{sec(ip['warm']['latency_s']['p50'])} | {sec(ip['warm']['latency_s']['p99'])} | "
      f"{sec(ip['warm']['latency_s']['max'])} | 0 |")
    w(f"| in process, cold | {ip['cold']['requests']:,} | {ip['cold']['rps']:,.0f} | "
      f"{sec(ip['cold']['latency_s']['p50'])} | {sec(ip['cold']['latency_s']['p99'])} | "
      f"{sec(ip['cold']['latency_s']['max'])} | 0 |")
    for name, h in (("HTTP, warm", hw), ("HTTP, cold", hc)):
        bad = h["errors"] + sum(v for k, v in h["status"].items() if str(k) != "200")
        w(f"| {name}, {h['concurrency']} httpx clients | {h['requests']:,} | {h['rps']:,.0f} | "
          f"{sec(h['latency_s']['p50'])} | {sec(h['latency_s']['p99'])} | {sec(h['latency_s']['max'])} | {bad} |")
    if ab and "rps" in ab:
        w(f"| HTTP, warm, `ab -k -c {ab['concurrency']}` (one URL) | {ab['requests']:,} | {ab['rps']:,.0f} | "
          f"{ab['p50_ms']} ms | {ab['p99_ms']} ms | | {ab['failed'] + ab['non_2xx']} |")
    fl = lk.get("floor")
    if fl:
        fh, fa_ = fl["httpx"], fl.get("ab")
        w(f"| *calibration:* an almost empty FastAPI endpoint (`bench/floor.py`), same serving, "
          f"{fh['concurrency']} httpx clients | {fh['requests']:,} | {fh['rps']:,.0f} | "
          f"{sec(fh['latency_s']['p50'])} | {sec(fh['latency_s']['p99'])} | {sec(fh['latency_s']['max'])} | "
          f"{fh['errors']} |")
        if fa_ and "rps" in fa_:
            w(f"| *calibration:* the same, `ab -k -c {fa_['concurrency']}` | {fa_['requests']:,} | "
              f"{fa_['rps']:,.0f} | {fa_['p50_ms']} ms | {fa_['p99_ms']} ms | | {fa_['failed'] + fa_['non_2xx']} |")
    w("")
    w(f"Load average {load(lk['loadavg'])}.")
    w("")
    w("![lookup](bench/lookup.png)")
    w("")
    return L


def targets(ctx: Context) -> list[str]:
    lk = ctx.res.get("lookup")
    if not lk:
        return []
    hw = lk["http"]["warm"]
    return [f"| lookup, warm | ≥ 5,000/s, p99 ≤ 5 ms | HTTP {hw['rps']:,.0f}/s, p99 {hw['latency_s']['p99'] * 1000:.1f} ms "
            f"({hw['concurrency']} httpx clients); in process {lk['in_process']['warm']['rps']:,.0f}/s, "
            f"p99 {lk['in_process']['warm']['latency_s']['p99'] * 1000:.3f} ms | "
            f"HTTP {ok(hw['rps'] >= TARGET_LOOKUP_RPS and hw['latency_s']['p99'] * 1000 <= TARGET_LOOKUP_P99_MS)} |"]


def plot(ctx: Context, img: Path) -> None:
    if lk := ctx.res.get("lookup"):
        plots.plot_lookup(lk, img / "lookup.png")


SECTION = Section(
    "lookup",
    4,
    body,
    title="## 4. Lookup",
    targets=targets,
    target_order=5,
    plot=plot,
)
