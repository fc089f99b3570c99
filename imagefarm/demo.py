"""The main job on the embedded default, end to end on one machine.

Starts the local registry and Redis, makes sample r2e-style bases (there is no
public registry to pull real ones from), pushes them under r2e names and lists
what the registry holds. Each stage of the farm adds its step here as it lands.
"""

from __future__ import annotations

import httpx
from rich.console import Console
from rich.table import Table

from . import devstack
from .reference import parse
from .settings import Settings
from .testing.images import FixtureFactory


def list_repositories(registry: str) -> list[tuple[str, str]]:
    base = f"http://{registry}/v2"
    repos = httpx.get(f"{base}/_catalog", params={"n": 1000}).json().get("repositories") or []
    rows = []
    for repo in repos:
        for tag in httpx.get(f"{base}/{repo}/tags/list").json().get("tags") or []:
            rows.append((repo, tag))
    return rows


def run_demo(settings: Settings, n_bases: int = 5, console: Console | None = None) -> list[str]:
    console = console or Console(stderr=True)
    for ep in devstack.up(settings):
        console.print(f"[bold]{ep.name}[/] on {ep.host}:{ep.port}" + (" (already running)" if ep.pid == 0 else ""))
    registry = parse(settings.to + ":x").registry
    with FixtureFactory(settings, f"{registry}", log=console.print) as factory:
        console.print(f"making {n_bases} sample r2e-style bases and a busybox base, pushing to {registry}")
        bases = [b.ref for b in factory.r2e_set(n_bases)] + [factory.busybox_base().ref]
    table = Table("repository", "tag", title=f"images in {registry}")
    for repo, tag in list_repositories(registry):
        table.add_row(repo, tag)
    Console().print(table)
    return bases
