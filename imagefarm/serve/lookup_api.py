"""The lookup service: base image -> prebuilt image over HTTP (FastAPI).

``GET /v1/lookup?image=[&agent_server_version=][&recipe=]`` answers one base (200 with the prebuilt reference, 404
naming the base and the command that builds it, 400 for a malformed reference,
version or recipe name; without a version: the server's ``--agent-server-version``,
else the newest verified version the base has);
``POST /v1/lookup`` answers thousands at once; ``POST /v1/invalidate`` drops cached
answers (a publisher calls it); ``/healthz``; Prometheus ``/metrics``; OpenAPI at
``/openapi.json``. An API key (``X-API-Key``) guards all but health, metrics and the
docs, checked before any body is read (``imagefarm.serve.apikey.protect``); serving without
one takes ``disable_auth=True`` (``--disable-auth``), as the runtime server does.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Query, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field

from imagefarm import __version__
from .apikey import check_key_config, protect
from imagefarm.farm.catalog import image_of
from imagefarm.errors import ImageRefused, ImagefarmError, InvalidRequest
from .httperrors import install_error_handlers
from .lookup import Lookup, build_command, normalise_query

MAX_BATCH = 20_000
#: bytes of a request body (413 beyond): a full batch of dataset rows fits
MAX_BODY = 32 << 20


class Prebuilt(BaseModel):
    base: str = Field(description="normalised base reference the image was derived from")
    base_digest: str
    image: str = Field(description="prebuilt reference with its tag")
    digest: str
    pinned: str = Field(description="repository@digest: what a runtime should start")
    recipe: str
    recipe_digest: str
    agent_server_version: str
    verified: bool
    source: str


class Missing(BaseModel):
    base: str
    message: str
    build: str = Field(description="the command that would build it")


#: the selection fields (query parameters of GET, body fields of POST)
VERSION_DOC = "openhands-agent-server version wanted (default: the server's, else the newest verified)"
RECIPE_DOC = "recipe name (default: the server's)"


class BatchRequest(BaseModel):
    images: list[str | dict[str, Any]] = Field(max_length=MAX_BATCH,
                                                description="base references or dataset rows")
    agent_server_version: str | None = Field(None, max_length=64, description=VERSION_DOC)
    recipe: str | None = Field(None, max_length=64, description=RECIPE_DOC)


class BatchAnswer(BaseModel):
    found: dict[str, Prebuilt]
    missing: dict[str, Missing]
    invalid: dict[str, str]


class Health(BaseModel):
    status: str
    version: str
    to: str
    recipe: str


def _key(q: Any, i: int) -> str:
    """How a batch answer names a query: the string itself, or a row's image."""
    if isinstance(q, str):
        return q
    try:
        image, _, _ = image_of(q)
    except ImagefarmError:
        image = None
    return image or f"row {i}"


def _outcome(exc: ImagefarmError) -> str:
    """The metrics label of a lookup that raised."""
    return "invalid" if isinstance(exc, InvalidRequest) else "refused" if isinstance(exc, ImageRefused) else "error"


def create_app(lookup: Lookup, api_key: str | None = None, *, disable_auth: bool = False) -> FastAPI:
    """The app; ``api_key`` is required unless ``disable_auth`` (``ConfigError``)."""
    key = check_key_config(api_key, disable_auth)
    app = FastAPI(title="imagefarm lookup", version=__version__,
                  description="Which prebuilt agent-server image serves this base image?")
    protect(app, key=key, open_paths={"/healthz", "/metrics"}, max_body=MAX_BODY)
    install_error_handlers(app, registry_context="target registry")
    metrics = CollectorRegistry()
    requests = Counter("imagefarm_lookup_requests_total", "lookups answered", ["result"], registry=metrics)
    latency = Histogram("imagefarm_lookup_seconds", "lookup latency", registry=metrics,
                        buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))

    def missing(base: str, version: str | None) -> Missing:
        version = version or lookup.version
        at = f" at openhands-agent-server {version}" if version else ""
        return Missing(base=base, message=f"no prebuilt image for {base}{at} under {lookup.to}",
                       build=build_command(base, lookup.to, version))

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health(status="ok", version=__version__, to=lookup.to, recipe=lookup.recipe.name)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/lookup", response_model=Prebuilt,
             responses={404: {"model": Missing}, 400: {"description": "malformed reference"},
                        409: {"description": "a derived image that must not be served (stale recipe, "
                                             "no boot check passed)"}})
    async def lookup_one(image: str = Query(..., max_length=4096,
                                            description="base reference, e.g. namanjain12/pandas_final:<commit>"),
                         agent_server_version: str | None = Query(None, max_length=64, description=VERSION_DOC),
                         recipe: str | None = Query(None, max_length=64, description=RECIPE_DOC)) -> Any:
        t0 = time.perf_counter()
        ask = {"recipe": recipe, "version": agent_server_version}
        hit = lookup.peek(image, **ask)  # warm: a dict hit on the event loop, no thread hop
        if hit is None:
            try:
                base = normalise_query(image)
                hit = await run_in_threadpool(lambda: lookup.resolve(str(base), **ask))  # cold: registry I/O
            except ImagefarmError as exc:  # answered by the app's error handler
                requests.labels(_outcome(exc)).inc()
                raise
            finally:
                latency.observe(time.perf_counter() - t0)
            if hit is None:
                requests.labels("miss").inc()
                return JSONResponse(status_code=404, content=missing(str(base), agent_server_version).model_dump())
        else:
            latency.observe(time.perf_counter() - t0)
        requests.labels("hit").inc()
        return Response(hit.json_bytes, media_type="application/json")

    @app.post("/v1/lookup", response_model=BatchAnswer)
    def lookup_batch(body: BatchRequest) -> BatchAnswer:
        t0 = time.perf_counter()
        lookup.wanted(body.recipe, body.agent_server_version)  # once, before thousands: a bad one is a 400 for all
        answers = lookup.resolve_many(body.images, recipe=body.recipe, version=body.agent_server_version)
        found, miss, invalid = {}, {}, {}
        for i, (q, a) in enumerate(zip(body.images, answers)):
            key = _key(q, i)
            if isinstance(a, (InvalidRequest, ImageRefused)):
                invalid[key] = str(a)
            elif isinstance(a, ImagefarmError):
                invalid[key] = f"target registry: {a}"
            elif a is None:
                miss[key] = missing(str(normalise_query(q)), body.agent_server_version)
            else:
                found[key] = Prebuilt(**a.to_json())
        requests.labels("batch").inc()
        latency.observe(time.perf_counter() - t0)
        return BatchAnswer(found=found, missing=miss, invalid=invalid)

    @app.post("/v1/invalidate")
    def invalidate(image: str | None = Query(None, max_length=4096)) -> dict[str, str]:
        lookup.invalidate(image)
        return {"invalidated": image or "all"}

    return app
