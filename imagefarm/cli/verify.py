"""``imagefarm verify IMAGE``: boot an agent-server image and prove it serves."""

from __future__ import annotations

import typer

from imagefarm.settings import Settings
from ._app import app, console, emit_json, friendly, out


@app.command("verify")
@friendly
def verify_cmd(
    image: str = typer.Argument(..., metavar="IMAGE", help="agent-server image reference"),
    timeout: float = typer.Option(120.0, "--timeout", help="seconds to wait for /alive and /health"),
    user: str = typer.Option(None, "--user", help="run as this user (e.g. 10001, as APIRemoteWorkspace does)"),
    workdir: str = typer.Option(None, "--workdir", help="working directory to start in"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Start IMAGE with podman the way a runtime does, wait for /alive and /health,
    run a command through the agent server's API and check it sees the base's python.

    Exit 2 with the reason (timeout, crash with log lines, wrong python) on failure.
    """
    from imagefarm.farm.verify import verify

    settings = Settings.load()
    console.print(f"verifying {image} ...", highlight=False)
    result = verify(settings, image, timeout=timeout, user=user, workdir=workdir)
    if as_json:
        emit_json(result.to_json())
        return
    out.print(f"ok {image}", highlight=False, soft_wrap=True)
    for check in result.checks:
        out.print(f"  {check}", highlight=False, markup=False, soft_wrap=True)
