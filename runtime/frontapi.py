"""What nodes call on a fleet's front (``/fleet/report``, ``/fleet/leave``): the wire
models and the routes, checked against the fleet key rather than the clients' key."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from .fleet import Fleet

#: what nodes call on the front: open to the app's guard, checked against the fleet key instead
FRONT_PATHS = ("/fleet/report", "/fleet/leave")


class NodeReport(BaseModel):
    node_id: str = Field(min_length=1, max_length=64, pattern=r"^[0-9A-Za-z_.-]+$")
    boot: str = Field(min_length=1, max_length=64)
    url: str = Field(min_length=1, max_length=1024, pattern=r"^https?://")
    address: str = Field(min_length=1, max_length=255)
    slots: int = Field(ge=0, le=100000)
    ready: bool = True
    images: list[str] = Field(default_factory=list, max_length=100000)
    runtimes: list[dict[str, Any]] = Field(default_factory=list, max_length=100000)
    stats: dict[str, Any] = Field(default_factory=dict)
    warm: dict[str, int] = Field(default_factory=dict)
    payloads: list[dict[str, Any]] = Field(default_factory=list, max_length=64)


class NodeLeave(BaseModel):
    node_id: str = Field(min_length=1, max_length=64)


def _peer(request: Request) -> str | None:
    return request.client.host if request.client else None


def add_front_routes(app: FastAPI, fleet: "Fleet") -> None:
    """``/fleet/report`` and ``/fleet/leave``: what nodes call, with the fleet key."""
    from .node import NODE_TOKEN, read_body

    @app.post("/fleet/report", tags=["fleet"])
    async def fleet_report(request: Request) -> dict[str, Any]:
        body = await read_body(request, fleet.fleet_key, NodeReport)
        token = fleet.book.admit(body.node_id, request.headers.get(NODE_TOKEN), _peer(request), body.url)
        answer = fleet.report(body.model_dump())
        return {**answer, "node_token": token} if token else answer

    @app.post("/fleet/leave", tags=["fleet"])
    async def fleet_leave(request: Request) -> dict[str, str]:
        body = await read_body(request, fleet.fleet_key, NodeLeave)
        fleet.book.admit(body.node_id, request.headers.get(NODE_TOKEN), _peer(request))
        fleet.leave(body.node_id)
        return {"node_id": body.node_id, "state": "left"}
