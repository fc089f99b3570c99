"""``imagefarm runtime serve``: the OpenHands remote runtime API, prebuilt images only."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

from imagefarm.errors import ConfigError
from imagefarm.settings import Settings
from ._app import app, console, friendly

runtime_app = typer.Typer(help="The runtime server: OpenHands remote runtime API over podman, "
                               "starting prebuilt agent-server images only.", no_args_is_help=True)
app.add_typer(runtime_app, name="runtime")


def _port_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split("-", 1))
    except ValueError:
        raise ConfigError(f"--port-range {text!r}: expected A-B, e.g. 30000-39999") from None
    return lo, hi


@runtime_app.command("serve")
@friendly
def serve_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="address the API listens on (0.0.0.0 on a cluster node)"),
    port: int = typer.Option(3000, "--port", help="API port (0: any free port; see --url-file)"),
    api_key: str = typer.Option(None, "--api-key", envvar="IMAGEFARM_RUNTIME_API_KEY", show_envvar=True,
                                help="key clients send as X-API-Key (prefer the variable: argv is visible)"),
    disable_auth: bool = typer.Option(False, "--disable-auth", help="accept requests without a key (loudly logged)"),
    to: str = typer.Option(None, "--to", help="registry prefix of prebuilt images (IMAGEFARM_TO)"),
    max_runtimes: int = typer.Option(32, "--max-runtimes", help="cap on concurrent runtimes (429 beyond)"),
    port_range: str = typer.Option("30000-39999", "--port-range", help="host ports runtimes are published on"),
    idle_timeout: float = typer.Option(3600, "--idle-timeout", help="remove runtimes idle this many seconds (0: never)"),
    publish_address: str = typer.Option("127.0.0.1", "--publish-address",
                                        help="address runtime ports are published on (0.0.0.0 for other nodes)"),
    public_host: str = typer.Option(None, "--public-host",
                                    help="host name put in URLs (default: the address, or this node's FQDN)"),
    user_policy: str = typer.Option("image", "--user-policy",
                                    help="image: run as the image's own user (r2e: root) whatever run_as_user "
                                         "asks; requested: honour run_as_user with HOME=/tmp"),
    cpus_per_factor: float = typer.Option(1.0, "--cpus-per-factor", help="--cpus per resource_factor unit"),
    memory_per_factor: int = typer.Option(4096, "--memory-mib-per-factor", help="memory MiB per resource_factor unit"),
    pids_limit: int = typer.Option(4096, "--pids-limit", help="process cap per runtime"),
    stop_on_exit: bool = typer.Option(False, "--stop-on-exit",
                                      help="remove all runtimes when the server stops (SLURM jobs)"),
    url_file: Path = typer.Option(None, "--url-file", envvar="IMAGEFARM_RUNTIME_URL_FILE",
                                  help="write the server URL here (atomically) once it accepts requests"),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Serve the runtime API (SDK APIRemoteWorkspace and V0 RemoteRuntime)."""
    from imagefarm.runtime import ServeConfig
    from imagefarm.runtime.serve import default_resolver, serve

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if user_policy not in ("image", "requested"):
        raise ConfigError(f"--user-policy {user_policy!r}: expected image or requested")
    settings = Settings.load(to=to)
    config = ServeConfig(
        api_key=api_key, disable_auth=disable_auth, max_runtimes=max_runtimes,
        port_range=_port_range(port_range), idle_timeout=idle_timeout, publish_address=publish_address,
        public_host=public_host, cpus_per_factor=cpus_per_factor, memory_mib_per_factor=memory_per_factor,
        pids_limit=pids_limit, user_policy=user_policy, stop_on_exit=stop_on_exit)  # type: ignore[arg-type]
    os.environ.pop("IMAGEFARM_RUNTIME_API_KEY", None)  # not inherited by podman and its children
    console.print(f"runtime server: prebuilt images under {settings.to}, state in {settings.state_dir / 'runtime'}")
    serve(settings, config, host=host, port=port, resolver=default_resolver(settings),
          url_file=url_file, public_host=public_host, log_level=log_level)
