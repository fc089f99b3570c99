"""``python -m bench``: run the sections, save ``docs/bench/results.json``, write
``docs/BENCHMARKS.md`` and the plots under ``docs/bench/``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import SECTIONS
from .context import REPO, Bench, Plan
from .machine import facts, loadavg


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _runner(name: str) -> Callable[[Bench], dict[str, Any]]:
    if name == "derive":
        from .derive import run_derive
        return run_derive
    if name == "scale":
        from .derive import run_scale
        return run_scale
    if name == "farm":
        from .farm import run_farm
        return run_farm
    if name == "copy":
        from .copy import run_copy
        return run_copy
    if name == "runtime":
        from .runtime import run_runtime
        return run_runtime
    if name == "lookup":
        from .lookup import run_lookup
        return run_lookup
    if name == "ratelimit":
        from .ratelimit import run_ratelimit
        return run_ratelimit
    if name == "fleet":
        from .fleet import run_fleet
        return run_fleet
    if name == "relayer":
        from .relayer import run_relayer
        return run_relayer
    if name == "v0":
        from .v0 import run_v0
        return run_v0
    if name == "relayer-real":
        from .relayer import run_relayer_real
        return run_relayer_real
    if name == "starts":
        from .runtime import run_starts
        return run_starts
    if name == "coldpull":
        from .coldpull import run_coldpull
        return run_coldpull
    raise ValueError(name)


def _command(only: list[str] | None, quick: bool, extra: list[str]) -> str:
    parts = [".venv/bin/python -m bench"]
    if quick:
        parts.append("--quick")
    if only:
        parts.append("--only " + ",".join(only))
    return " ".join(parts + extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes: a few minutes, for developing the harness")
    p.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument("--out", default=str(REPO / "docs"), help="where BENCHMARKS.md and bench/ go (default docs/)")
    p.add_argument("--no-merge", action="store_true",
                   help="with --only: drop the other sections' earlier results instead of keeping them")
    p.add_argument("--keep-logs", metavar="DIR", help="copy the services' logs here before the work dir goes")
    p.add_argument("--report-only", action="store_true", help="re-render BENCHMARKS.md and plots from results.json")
    g = p.add_argument_group("sizes (override the --quick/full plan)")
    g.add_argument("--bases", type=int, dest="real_bases", help="realistic bases (derive, copy, runtime)")
    g.add_argument("--unique-mib", type=int, dest="real_unique_mib", help="random MiB unique to each realistic base")
    g.add_argument("--naive", type=int, dest="naive_bases", help="how many realistic bases the naive path builds")
    g.add_argument("--naive-budget", type=float, dest="naive_budget_s", help="seconds after which the naive loop stops")
    g.add_argument("--small-bases", type=int, dest="small_bases", help="small bases (scale, farm, lookup)")
    g.add_argument("--farm-bases", type=int, dest="farm_full_bases", help="bases of the full-size farm run (4578)")
    g.add_argument("--starts", type=int, dest="warm_starts", help="warm runtime starts")
    args = p.parse_args(argv)

    out = Path(args.out)
    results_path = out / "bench" / "results.json"
    if args.report_only:
        from .report import render
        render(json.loads(results_path.read_text()), out)
        _log(f"wrote {out / 'BENCHMARKS.md'}")
        return 0

    only = [s.strip() for s in args.only.split(",")] if args.only else None
    for s in only or []:
        if s not in SECTIONS:
            p.error(f"unknown section {s!r}: choose from {', '.join(SECTIONS)}")
    sections = [s for s in SECTIONS if not only or s in only]
    overrides = {k: getattr(args, k) for k in ("real_bases", "real_unique_mib", "naive_bases", "naive_budget_s",
                                               "small_bases", "farm_full_bases", "warm_starts")}
    extra: list[str] = []  # sizes given on the command line, echoed in the reproduce commands
    for flag, key in (("--bases", "real_bases"), ("--unique-mib", "real_unique_mib"), ("--naive", "naive_bases"),
                      ("--naive-budget", "naive_budget_s"), ("--small-bases", "small_bases"),
                      ("--farm-bases", "farm_full_bases"),
                      ("--starts", "warm_starts")):
        if overrides[key] is not None:
            extra.append(f"{flag} {overrides[key]:g}" if isinstance(overrides[key], float) else f"{flag} {overrides[key]}")
    plan = Plan.make(args.quick, **overrides)

    if os.geteuid() != 0:
        _log("warning: not root: buildah/podman storage and the runtime section need root here")

    def _term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # started in the background by a non-interactive shell, SIGINT comes in ignored: listen anyway
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGHUP, _term)

    bench = Bench(plan, _log, keep_logs=args.keep_logs)
    machine = facts(REPO, bench.work)
    _log(f"{machine['cores']} cores, {machine['memory_total_gb']} GB, load {machine['loadavg_start']}, "
         f"work dir {bench.work}; sections: {', '.join(sections)} ({'quick' if plan.quick else 'full'})")
    old: dict[str, Any] = {}
    if results_path.exists() and only and not args.no_merge:
        try:
            old = json.loads(results_path.read_text())
        except ValueError:
            old = {}
    results: dict[str, Any] = {
        "machine": machine, "plan": plan.__dict__, "command": _command(only, args.quick, extra),
        "make": not only and not args.quick and not extra, "sections": dict(old.get("sections", {})),
        "notes": {},
    }
    interrupted = False
    t_run = time.monotonic()
    try:
        for name in sections:
            _log(f"== {name}")
            t0 = time.monotonic()
            load0 = loadavg()
            entry: dict[str, Any] = {"command": _command([name], args.quick, extra), "quick": plan.quick,
                                     "run": machine["when"],
                                     "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg_start": load0}
            try:
                entry["result"] = _runner(name)(bench)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one section failing must not lose the others
                entry["error"] = f"{type(exc).__name__}: {exc}"
                entry["traceback"] = traceback.format_exc()[-4000:]
                _log(f"{name} FAILED: {entry['error']}")
            entry["seconds"] = time.monotonic() - t0
            entry["loadavg_end"] = loadavg()
            results["sections"][name] = entry
            _log(f"== {name} done in {entry['seconds']:.0f}s")
    except KeyboardInterrupt as exc:
        interrupted = True
        _log(f"interrupted ({exc or 'Ctrl-C'}): cleaning up")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        results["notes"] = {k: v for k, v in bench.notes.items()}
        try:
            bench.close()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    results["seconds"] = time.monotonic() - t_run
    results["interrupted"] = interrupted
    if interrupted:
        _log("interrupted: results not written")
        return 130
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1, sort_keys=True, default=str) + "\n")
    from .report import render
    render(results, out)
    _log(f"wrote {out / 'BENCHMARKS.md'} and {results_path} in {results['seconds'] / 60:.1f} min")
    return 1 if any("error" in results["sections"].get(s, {}) for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
