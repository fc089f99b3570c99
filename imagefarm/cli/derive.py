"""``imagefarm derive BASE``: one base -> one agent-server image, printed as ref@digest."""

from __future__ import annotations

import typer

from imagefarm.settings import Settings
from ._app import app, console, emit_json, friendly, out
from .payload import version_option


@app.command("derive")
@friendly
def derive_cmd(
    base_ref: str = typer.Argument(..., metavar="BASE_REF", help="base image, e.g. namanjain12/pandas_final:<commit>"),
    to: str = typer.Option(None, "--to", help="registry prefix to push to (IMAGEFARM_TO)"),
    recipe: str = typer.Option(None, "--recipe", help="recipe name or path (IMAGEFARM_RECIPE)"),
    agent_server_version: str = version_option(),
    platform: str = typer.Option(None, "--platform", help="platform picked from image indexes"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    payload_layer: str = typer.Option(
        None, "--payload-layer", hidden=True,
        help="use this tar+gzip layer blob as the payload instead of building the recipe's"),
    payload_from: str = typer.Option(
        None, "--payload-from", metavar="PREFIX",
        help="registry prefix holding the payload (pushed by `imagefarm payload push`) when "
             "neither the cache nor --to has it (IMAGEFARM_PAYLOAD_FROM)"),
) -> None:
    """Derive the agent-server image of BASE_REF and push it under --to.

    The fast path appends the recipe's payload layer to the base by manifest surgery
    (no base layer is pulled); recipes of kind "buildah" are built with buildah. A
    derive that already exists is reported as skipped and costs two requests.
    """
    from imagefarm.derive import Appender, AppendPayload
    from imagefarm.derive.build import build
    from imagefarm.payload.recipe import recipe_for
    from imagefarm.names.reference import parse

    base = parse(base_ref)  # bad input fails at once, not after a payload build; parsed once
    settings = Settings.load(to=to, recipe=recipe, platform=platform, payload_from=payload_from,
                             agent_server_version=agent_server_version)
    rec = recipe_for(settings)
    if rec.kind == "buildah":
        result = build(base, rec, settings)
    else:
        with Appender(settings) as appender:
            if payload_layer:
                from imagefarm.derive.values import payload_from_file
                payload = payload_from_file(payload_layer, rec)
            else:
                from imagefarm.payload.remote import locate
                found = locate(settings, rec, appender.client,
                               log=lambda m: console.print(m, highlight=False, soft_wrap=True))
                payload = found if hasattr(found, "source") else AppendPayload.of(found, rec)
            result = appender.derive(base, payload)
    if as_json:
        emit_json(result.to_json())
        return
    out.print(result.ref, highlight=False, soft_wrap=True)
    state = "already there (skipped)" if result.skipped else f"{result.kind} derive"
    console.print(f"{state}: {result.requests} requests, {result.blobs_uploaded} blobs / "
                  f"{result.bytes_moved} bytes sent", highlight=False)
