"""The main job on the embedded default, end to end on one machine.

Starts the local registry and Redis, makes sample r2e-style bases (there is no
public registry to pull real ones from) and pushes them under r2e names, builds the
agent-server payload (once; cached), prebuilds every base into a verified
agent-server image with a lockfile, and answers a lookup for each base.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from . import devstack
from imagefarm.serve.lookup import Lookup
from imagefarm.farm.prebuild import run_batch
from imagefarm.names.reference import parse
from imagefarm.settings import Settings
from .samples import FixtureFactory
from .statedir import state_subdir


def run_demo(settings: Settings, n_bases: int = 5, verify: str = "1", console: Console | None = None) -> Path:
    console = console or Console(stderr=True)
    for ep in devstack.up(settings):
        console.print(f"[bold]{ep.name}[/] on {ep.host}:{ep.port}" + (" (already running)" if ep.pid == 0 else ""))
    registry = parse(settings.to + ":x").registry
    with FixtureFactory(settings, registry, log=console.print) as factory:
        console.print(f"[bold]bases[/]: making {n_bases} sample r2e-style bases, pushing them to {registry}")
        bases = [b.ref for b in factory.r2e_set(n_bases)]
    demo_dir = state_subdir(settings.state_dir, "demo")
    dataset = demo_dir / "train.jsonl"
    dataset.write_text("".join(json.dumps({"data_source": "r2e-gym", "instance": {"instance_id": b}}) + "\n"
                               for b in bases))
    lockfile = demo_dir / "lock.json"
    console.print(f"[bold]prebuild[/]: {dataset} -> {settings.to} (payload built once, then cached)")
    result = run_batch(settings, str(dataset), executor="local", verify=verify, lockfile=lockfile,
                       log=lambda m: console.print(f"  {m}", highlight=False))
    s = result.state
    console.print(f"derived {s.derived}, already done {s.skipped}, failed {s.failed}, verified {s.verified}")
    out = Console(soft_wrap=True, highlight=False)
    out.print("[bold]lookup[/]: base -> prebuilt image (pinned by digest)")
    lk = Lookup(settings, lockfile=lockfile)
    try:
        for b in bases:
            hit = lk.resolve(b)
            state = ("verified" if hit.verified else "not verified") if hit else "[red]no prebuilt image[/]"
            out.print(f"  {parse(b).familiar}\n    -> {hit.pinned if hit else '-'}  ({state})")
    finally:
        lk.close()
    console.print(f"lockfile: {lockfile}\nstop the services with: imagefarm dev down")
    return lockfile
