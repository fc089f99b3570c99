"""``imagefarm demo``: the main job on the embedded default."""

from __future__ import annotations

import typer

from imagefarm.host.demo import run_demo
from imagefarm.settings import Settings
from ._app import app, friendly


@app.command()
@friendly
def demo(
    bases: int = typer.Option(5, min=1, help="how many sample r2e-style bases to make"),
    verify: str = typer.Option("1", help="boot-check all, none, or a sample of N images"),
) -> None:
    """The main job on one machine: local registry and Redis, sample r2e bases,
    the agent-server payload, a verified prebuild with lockfile, lookups.

    The first run builds the payload (a few minutes); later runs reuse it.
    Stop the services afterwards with `imagefarm dev down`.
    """
    run_demo(Settings.load(), n_bases=bases, verify=verify)
