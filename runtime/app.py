"""The FastAPI app: the OpenHands remote runtime API over a ``service.RuntimeService``.

``create_app(settings, backend, resolver, config)`` wires everything; the CLI
(``imagefarm runtime serve``) and the tests run it under uvicorn.

Status codes, chosen after what the clients do with them:

* 401 missing or wrong ``X-API-Key`` (compared with ``hmac.compare_digest``), answered
  from the headers before any body byte is read (``imagefarm.serve.apikey.protect``);
* 413 a body over ``ServeConfig.max_body`` (1 MiB: a /start body is a few KB);
* 404 ``/start`` of an image with no prebuilt image (``detail`` names the base and
  the ``imagefarm derive`` / ``imagefarm prebuild`` command); neither client retries
  a 404 on ``/start`` and both surface ``detail`` (V0 appends it to its error);
  404 also for an unknown session (both clients read that as "new session") or
  runtime id;
* 429 when ``--max-runtimes`` run (V0's request helper retries 429 with backoff);
* 501 ``/build`` and ``/build_status``: this server never builds;
* 409 a derived image the lookup refuses (stale recipe, no boot check passed);
* 422 a body of the wrong shape (FastAPI's validation; values are never echoed), never a 500.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from imagefarm.serve.apikey import protect
from imagefarm.errors import ImageRefused, ImagefarmError, InvalidReference, RegistryError, http_status
from imagefarm.settings import Settings, check_version

from .backend import PodmanBackend
from .config import ServeConfig
from .errors import BuildRefused, NoPrebuiltImage, RuntimeServerError, UnknownRuntime
from .metrics import add_metrics
from .models import (ActionResult, ErrorBody, Health, ImageDetails, ImageExists, PrefetchRequest,
                     RegistryPrefix, RuntimeInfo, RuntimeList, RuntimeRef, StartRequest)
from .resolver import Resolver, pinned_image
from .service import RuntimeService

log = logging.getLogger("imagefarm.runtime")

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or wrong X-API-Key"},
    404: {"model": ErrorBody, "description": "unknown runtime/session, or no prebuilt image"},
}
BUILD_REFUSAL = ("this runtime server starts prebuilt images only and never builds: build agent-server "
                 "images ahead of time with `imagefarm derive <base> --to {to}` or `imagefarm prebuild "
                 "--to {to}`, then start them by their base or prebuilt reference")


def create_app(settings: Settings, backend: PodmanBackend | None, resolver: Resolver,
               config: ServeConfig, *, manager: RuntimeService | None = None,
               open_paths: tuple[str, ...] = ()) -> FastAPI:
    """``manager``: a ``fleet.Fleet`` for a front; by default this server is its own only node.
    ``open_paths``: paths the guard leaves to their own key check (a front's ``/fleet/*``,
    which nodes call with the fleet key, never the clients' key).

    ``app.state.after_startup`` / ``before_shutdown``: coroutines a node process or a
    front adds (joining, reporting), run after the manager starts and before it stops."""
    if manager is None:
        from .manager import RuntimeManager

        manager = RuntimeManager(settings, backend, resolver, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if config.disable_auth:
            log.warning("!!! AUTHENTICATION DISABLED (--disable-auth): anyone who reaches this port "
                        "can start containers on this node !!!")
        await manager.startup()
        for hook in app.state.after_startup:
            await hook()
        try:
            yield
        finally:
            for hook in app.state.before_shutdown:
                await hook()
            await manager.shutdown()

    app = FastAPI(
        title="imagefarm runtime server",
        version="1",
        summary="OpenHands remote runtime API (APIRemoteWorkspace and V0 RemoteRuntime) "
                "starting prebuilt agent-server images under podman",
        lifespan=lifespan,
    )
    app.state.manager = manager
    app.state.after_startup, app.state.before_shutdown = [], []
    protect(app, key=None if config.disable_auth else config.api_key,
            open_paths={"/alive", "/health", *open_paths}, max_body=config.max_body)

    @app.exception_handler(RuntimeServerError)
    async def _runtime_error(request: Request, exc: RuntimeServerError) -> JSONResponse:
        headers = {"Retry-After": "10"} if exc.status_code == 429 else None
        return JSONResponse({"detail": str(exc)}, status_code=http_status(exc), headers=headers)

    @app.exception_handler(InvalidReference)
    async def _bad_ref(request: Request, exc: InvalidReference) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=http_status(exc))

    @app.exception_handler(ImageRefused)
    async def _refused(request: Request, exc: ImageRefused) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=http_status(exc))

    @app.exception_handler(RegistryError)
    async def _registry(request: Request, exc: RegistryError) -> JSONResponse:
        return JSONResponse({"detail": f"the registry could not be asked for a prebuilt image: {exc}"},
                            status_code=http_status(exc), headers={"Retry-After": "5"})

    @app.exception_handler(ImagefarmError)
    async def _other(request: Request, exc: ImagefarmError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=http_status(exc))

    # -- no auth: liveness of the server itself -------------------------------------------
    def health() -> Health:
        return Health(server_id=manager.server_id, runtimes=manager.live_count(),
                      max_runtimes=config.max_runtimes, auth=not config.disable_auth)

    app.get("/alive", response_model=Health, tags=["server"], summary="liveness (no auth)")(health)
    app.get("/health", response_model=Health, tags=["server"], summary="liveness (no auth)")(health)

    api = APIRouter(responses=ERRORS)

    @api.post("/start", response_model=RuntimeInfo, tags=["runtimes"],
              responses={429: {"model": ErrorBody, "description": "server full (--max-runtimes)"}})
    async def start(req: StartRequest) -> RuntimeInfo:
        """Start a runtime for ``session_id`` from the prebuilt image serving ``image``.

        Answers at once (``pod_status`` pending); poll ``/sessions/{session_id}`` for
        ``ready``. A second ``/start`` for a live session answers the same runtime.
        """
        return manager.info(await manager.start(req))

    @api.get("/sessions/batch", response_model=list[RuntimeInfo], tags=["runtimes"])
    async def sessions_batch(ids: list[str] = Query(default_factory=list)) -> list[RuntimeInfo]:
        """The runtimes of the given session ids (unknown ids are left out)."""
        out = []
        for sid in ids:
            try:
                out.append(manager.info(manager.by_session_id(sid)))
            except UnknownRuntime:
                continue
        return out

    @api.get("/sessions/{session_id}", response_model=RuntimeInfo, tags=["runtimes"])
    async def session(session_id: str) -> RuntimeInfo:
        """The runtime of a session: ``status`` (running/paused/error) and ``pod_status``."""
        rec = manager.by_session_id(session_id)  # a poll: the idle clock runs on
        await manager.refresh(rec)
        return manager.info(rec)

    @api.get("/runtime/{runtime_id}", response_model=RuntimeInfo, tags=["runtimes"])
    async def runtime(runtime_id: str) -> RuntimeInfo:
        """One runtime by id (V0 polls this for ``pod_status``)."""
        rec = manager.get(runtime_id)  # a poll: the idle clock runs on
        await manager.refresh(rec)
        return manager.info(rec)

    @api.get("/list", response_model=RuntimeList, tags=["runtimes"])
    async def list_runtimes() -> RuntimeList:
        return RuntimeList(runtimes=[manager.info(r) for r in manager.runtimes()])

    @api.post("/stop", response_model=ActionResult, tags=["runtimes"])
    async def stop(req: RuntimeRef) -> ActionResult:
        await manager.stop(req.runtime_id)
        return ActionResult(runtime_id=req.runtime_id, status="stopped")

    @api.post("/pause", response_model=ActionResult, tags=["runtimes"])
    async def pause(req: RuntimeRef) -> ActionResult:
        rec = await manager.pause(req.runtime_id)
        return ActionResult(runtime_id=rec.runtime_id, status=rec.status)

    @api.post("/resume", response_model=ActionResult, tags=["runtimes"])
    async def resume(req: RuntimeRef) -> ActionResult:
        rec = await manager.resume(req.runtime_id)
        return ActionResult(runtime_id=rec.runtime_id, status=rec.status,
                            session_api_key=rec.session_api_key, url=rec.url)

    @api.get("/image_exists", response_model=ImageExists, tags=["images"])
    async def image_exists(image: str = Query(..., min_length=1, max_length=1024),
                           recipe: str | None = Query(None, min_length=1, max_length=128,
                                                      pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"),
                           agent_server_version: str | None = Query(None, min_length=1, max_length=64)
                           ) -> ImageExists:
        """Whether a prebuilt image of ``recipe`` (None: the server's) at
        ``agent_server_version`` (None: the server's default) serves ``image`` (V0 asks
        before starting)."""
        if agent_server_version is not None:
            try:
                check_version(agent_server_version)
            except ValueError as exc:
                raise RequestValidationError([{"loc": ("query", "agent_server_version"), "msg": str(exc),
                                               "type": "value_error"}]) from None
        try:
            hit = await manager.resolve(image, recipe, version=agent_server_version)
        except (NoPrebuiltImage, ImageRefused) as exc:
            return ImageExists(exists=False, detail=str(exc))
        size = await manager.image_size(hit)
        return ImageExists(exists=True, image=ImageDetails(
            image=image, prebuilt_image=pinned_image(hit), base_image=getattr(hit, "base", None),
            image_size_bytes=int(size), verified=bool(getattr(hit, "verified", False)),
            agent_server_version=getattr(hit, "agent_server_version", None)))

    @api.get("/registry_prefix", response_model=RegistryPrefix, tags=["images"])
    async def registry_prefix() -> RegistryPrefix:
        """Where prebuilt images live (``--to``)."""
        return RegistryPrefix(registry_prefix=manager.to)

    @api.post("/build", tags=["images"], responses={501: {"model": ErrorBody}})
    async def build() -> None:
        """Refused: this server starts prebuilt images only."""
        raise BuildRefused(BUILD_REFUSAL.format(to=manager.to))

    @api.get("/build_status", tags=["images"], responses={501: {"model": ErrorBody}})
    async def build_status() -> None:
        """Refused: this server starts prebuilt images only (there are no builds)."""
        raise BuildRefused(BUILD_REFUSAL.format(to=manager.to))

    @api.post("/prefetch", tags=["images"])
    async def prefetch(req: PrefetchRequest) -> dict[str, Any]:
        """Pull these images onto the node(s) ahead of the trainer, spread as starts would be."""
        return {"images": await manager.prefetch(req)}

    @api.get("/nodes", tags=["fleet"])
    async def nodes() -> list[dict[str, Any]]:
        """The nodes runtimes run on: capacity, free slots, runtimes by state, images, pulls."""
        return manager.node_rows()

    app.include_router(api)
    add_metrics(app, manager)
    return app
