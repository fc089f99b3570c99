"""How both servers (the lookup API and the runtime server) answer an imagefarm error: its
own HTTP status (``errors.http_status``), ``{"detail": message}``, and ``Retry-After`` where
waiting helps (a server at capacity, a registry that failed). Installed once per app with
``install_error_handlers``; routes raise, they do not convert."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from imagefarm.errors import ImagefarmError, RegistryError, http_status

#: seconds a client is told to wait: a full server frees slots slower than a registry recovers
RETRY_FULL_S, RETRY_REGISTRY_S = 10, 5


def error_response(exc: ImagefarmError, *, registry_context: str) -> JSONResponse:
    """The answer to ``exc``; a registry failure is said as ``registry_context: <error>``."""
    status = http_status(exc)
    if isinstance(exc, RegistryError):
        return JSONResponse({"detail": f"{registry_context}: {exc}"}, status_code=status,
                            headers={"Retry-After": str(RETRY_REGISTRY_S)})
    headers = {"Retry-After": str(RETRY_FULL_S)} if status == 429 else None
    return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, *,
                           registry_context: str = "the registry could not be asked for a prebuilt image") -> None:
    """One handler for the whole error tree (a subclass finds it through its MRO)."""

    @app.exception_handler(ImagefarmError)
    async def _imagefarm_error(request: Request, exc: ImagefarmError) -> JSONResponse:
        return error_response(exc, registry_context=registry_context)
