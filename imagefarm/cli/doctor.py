"""``imagefarm doctor`` and ``imagefarm dev up|down``."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from imagefarm.host import devstack
from imagefarm.host.doctor import run_checks
from imagefarm.names.reference import parse
from imagefarm.settings import Settings
from ._app import app, console, emit_json, friendly, out


@app.command()
@friendly
def doctor(
    to: Optional[str] = typer.Option(None, help="registry prefix to check (IMAGEFARM_TO)"),
    broker_url: Optional[str] = typer.Option(None, help="Redis URL to check (IMAGEFARM_BROKER_URL)"),
    no_services: bool = typer.Option(False, "--no-services", help="check only local tools, not registry/Redis"),
    json_out: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Check buildah, podman (really starts a container), skopeo, the registry and Redis,
    and what rootless use needs (subuid/subgid, newuidmap, /dev/net/tun, user namespaces,
    mmdebstrap, the storage driver).

    Prints what is missing with the command that fixes it; exits 1 if anything is.
    """
    settings = Settings.load(to=to, broker_url=broker_url)
    checks = run_checks(settings, services=not no_services)
    if json_out:
        emit_json([c.__dict__ for c in checks])
    else:
        table = Table("part", "", "detail", "fix")
        for c in checks:
            table.add_row(c.part, "[green]ok[/]" if c.ok else "[red]MISSING[/]", c.detail, c.fix)
        out.print(table)
    missing = [c for c in checks if not c.ok]
    if missing:
        if not json_out:
            for c in missing:
                out.print(f"missing {c.part}: {c.detail}; fix: {c.fix}", soft_wrap=True, highlight=False, markup=False)
        console.print(f"[red]{len(missing)} part(s) missing[/]: run the fix shown for each")
        raise typer.Exit(1)


dev = typer.Typer(help="The embedded default: a local registry and Redis for one machine.", no_args_is_help=True)
app.add_typer(dev, name="dev")


@dev.command("up")
@friendly
def dev_up(
    to: Optional[str] = typer.Option(None, help="registry prefix; its host:port is where the registry listens"),
    broker_url: Optional[str] = typer.Option(None, help="Redis URL; its port is where Redis listens"),
    cache_registry: Optional[str] = typer.Option(
        None, "--cache-registry", metavar="REGISTRY",
        help="also run a pull-through cache of this registry (docker.io): the mirror IMAGEFARM_MIRRORS points at"),
    cache_port: Optional[int] = typer.Option(None, "--cache-port", min=1, max=65535,
                                             help="the cache's port (default: registry's + 1)"),
    old_mirror: Optional[str] = typer.Option(None, "--mirror", hidden=True),  # the old name, still read
    old_mirror_port: Optional[int] = typer.Option(None, "--mirror-port", min=1, max=65535, hidden=True),
) -> None:
    """Start the local registry and Redis (idempotent; data kept under the state dir)."""
    settings = Settings.load(to=to, broker_url=broker_url)
    mirror, mirror_port = cache_registry or old_mirror, cache_port or old_mirror_port
    if mirror:
        devstack.remote_url(mirror)  # a bad name fails here, before anything starts
    for ep in devstack.up(settings, mirror, mirror_port):
        out.print(f"{ep.name:9} {ep.host}:{ep.port}  pid {ep.pid}")
        if ep.name == "redis" and devstack.dev_password_file(settings.state_dir).exists():
            out.print(f"          password (ACL user farm) in {devstack.dev_password_file(settings.state_dir)} "
                      "(0600): commands and workers on this machine read it there", markup=False, soft_wrap=True)
        if ep.name == "mirror":
            out.print(f"          read {mirror} through it: export IMAGEFARM_MIRRORS="
                      f"'{{\"{parse(f'{mirror}/x/y:z').registry}\": \"{ep.host}:{ep.port}\"}}'", markup=False)


@dev.command("down")
@friendly
def dev_down() -> None:
    """Stop the local registry and Redis started by `dev up`."""
    stopped = devstack.down(Settings.load())
    out.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
