"""``imagefarm lookup`` and ``imagefarm serve-lookup``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from imagefarm.serve.lookup import Lookup, build_command, normalise_query
from imagefarm.serve.config import LookupServerConfig
from imagefarm.settings import Settings
from ._app import app, console, emit_json, friendly, option, out


@app.command()
@friendly
def lookup(
    base: list[str] = typer.Argument(..., help="base reference(s), e.g. namanjain12/pandas_final:<commit>"),
    to: Optional[str] = typer.Option(None, help="registry prefix prebuilt images live under (IMAGEFARM_TO)"),
    recipe: Optional[str] = typer.Option(None, help="recipe name or path (IMAGEFARM_RECIPE)"),
    agent_server_version: Optional[str] = typer.Option(
        None, "--agent-server-version", metavar="VERSION",
        help="images of this openhands-agent-server version (IMAGEFARM_AGENT_SERVER_VERSION); "
             "default: the newest verified one of each base"),
    lockfile: Optional[Path] = typer.Option(None, help="answer from this lockfile first"),
    json_out: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Which prebuilt image serves this base? Exit 1 if any base has none."""
    settings = Settings.load(to=to, recipe=recipe, agent_server_version=agent_server_version)
    lk = Lookup(settings, lockfile=lockfile)
    try:
        answers = lk.resolve_many(base)
    finally:
        lk.close()
    results, missing = [], 0
    for q, a in zip(base, answers):
        if isinstance(a, Exception):
            raise a
        if a is None:
            missing += 1
            ref = str(normalise_query(q))
            build = build_command(ref, lk.to, lk.version)
            results.append({"base": ref, "found": False, "build": build})
            if not json_out:
                at = f" at openhands-agent-server {lk.version}" if lk.version else ""
                console.print(f"[red]no prebuilt image[/] for {ref}{at}; build it with: {build}", highlight=False)
        else:
            results.append({"found": True, **a.to_json()})
            if not json_out:
                out.print(f"{a.pinned}" + ("" if a.verified else "  (not verified)"), highlight=False)
    if json_out:
        emit_json(results if len(results) > 1 else results[0])
    if missing:
        raise typer.Exit(1)


@app.command("serve-lookup")
@friendly
def serve_lookup(
    host: str = option(LookupServerConfig, "host"),
    port: int = option(LookupServerConfig, "port"),
    to: Optional[str] = typer.Option(None, help="registry prefix (IMAGEFARM_TO)"),
    recipe: Optional[str] = typer.Option(None, help="recipe name or path (IMAGEFARM_RECIPE)"),
    agent_server_version: Optional[str] = typer.Option(
        None, "--agent-server-version", metavar="VERSION",
        help="the version a request without `agent_server_version` gets (IMAGEFARM_AGENT_SERVER_VERSION); "
             "default: the newest verified one of each base"),
    lockfile: Optional[Path] = option(LookupServerConfig, "lockfile"),
    api_key: Optional[str] = option(LookupServerConfig, "api_key", "--api-key", envvar="IMAGEFARM_LOOKUP_API_KEY",
                                    show_envvar=True),
    disable_auth: bool = option(LookupServerConfig, "disable_auth", "--disable-auth"),
    ttl: float = option(LookupServerConfig, "ttl"),
) -> None:
    """Serve lookups over HTTP: /v1/lookup, /healthz, /metrics, /docs."""
    import os

    import uvicorn

    from imagefarm.serve.lookup_api import create_app

    # checked before anything starts: a bad value or a missing key is one line, exit 2, with the fix
    cfg = LookupServerConfig(host, port, lockfile, ttl, api_key, disable_auth)
    os.environ.pop("IMAGEFARM_LOOKUP_API_KEY", None)
    settings = Settings.load(to=to, recipe=recipe, agent_server_version=agent_server_version)
    lk = Lookup(settings, lockfile=cfg.lockfile, ttl=cfg.ttl)
    app_ = create_app(lk, cfg.api_key, disable_auth=cfg.disable_auth)
    if disable_auth:
        logging.getLogger("imagefarm").warning("!!! AUTHENTICATION DISABLED (--disable-auth): anyone who reaches "
                                               "this port can query and invalidate the lookup !!!")
        console.print("[red]!!! AUTHENTICATION DISABLED (--disable-auth) !!![/]")
    console.print(f"lookup API on http://{host}:{port} for {lk.to} "
                  f"(API key {'not required' if disable_auth else 'required'})", highlight=False)
    uvicorn.run(app_, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
