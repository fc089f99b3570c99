"""What the API (``app.py``) and the metrics (``metrics.py``) ask of a runtime server.

Two implementations: ``manager.RuntimeManager`` (the runtimes of this node, under
podman) and ``fleet.Fleet`` (a front: runtimes on the nodes that joined it). The app
and the metrics use this surface alone, so either can stand behind the same API.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from .config import ServeConfig
from .models import PrefetchRequest, RuntimeInfo, StartRequest


@runtime_checkable
class RuntimeService(Protocol):
    server_id: str
    to: str                       #: the registry prefix of prebuilt images (``/registry_prefix``)
    config: ServeConfig
    #: called with (record, seconds from /start to ready)
    on_ready: list[Callable[[Any, float], None]]

    async def startup(self) -> None: ...
    async def shutdown(self) -> None: ...

    # -- runtimes -------------------------------------------------------------------
    async def start(self, req: StartRequest) -> Any:
        """A runtime for ``req.session_id`` (the same one again while it lives)."""

    def get(self, runtime_id: str) -> Any:
        """The record of ``runtime_id``; ``UnknownRuntime`` (404) without one."""

    def by_session_id(self, session_id: str) -> Any:
        """The record of ``session_id``; ``UnknownRuntime`` (404) without one."""

    def runtimes(self) -> list[Any]:
        """Every runtime the clients see (``/list``)."""

    def live_count(self) -> int: ...
    def touch(self, rec: Any) -> None:
        """A client acted on ``rec``: its idle clock starts again."""

    async def refresh(self, rec: Any) -> None:
        """A status poll: bring ``rec`` up to date where that is cheap."""

    def info(self, rec: Any) -> RuntimeInfo: ...
    async def stop(self, runtime_id: str, why: str = "stopped") -> None: ...
    async def pause(self, runtime_id: str) -> Any: ...
    async def resume(self, runtime_id: str) -> Any: ...

    # -- images ---------------------------------------------------------------------
    async def resolve(self, image: str, recipe: str | None = None, *, version: str | None = None) -> Any: ...
    async def image_size(self, hit: Any) -> int: ...
    async def prefetch(self, req: PrefetchRequest) -> list[dict[str, Any]]:
        """``POST /prefetch``: one row per image (see ``models.PrefetchRequest``)."""

    # -- operators ------------------------------------------------------------------
    def node_rows(self) -> list[dict[str, Any]]:
        """``GET /nodes``: per node, capacity, free slots, runtimes by state, images, pulls."""

    def counters(self) -> dict[str, int]:
        """Counts since start for ``/metrics`` (warm sandbox hits and misses)."""
