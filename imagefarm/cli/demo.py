"""``imagefarm demo``: the main job on the embedded default."""

from __future__ import annotations

import typer

from ..demo import run_demo
from ..settings import Settings
from ._app import app, friendly


@app.command()
@friendly
def demo(bases: int = typer.Option(5, min=1, help="how many sample r2e-style bases to make")) -> None:
    """Start a local registry and Redis, make sample r2e bases, push them, list them.

    Stop the services afterwards with `imagefarm dev down`.
    """
    run_demo(Settings.load(), n_bases=bases)
