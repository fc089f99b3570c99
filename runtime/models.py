"""Request and response bodies of the OpenHands remote runtime API, as the clients use them.

Field names come from the two real clients (``APIRemoteWorkspace`` in
openhands-workspace 1.x, ``RemoteRuntime`` in openhands-ai 0.x) and from OpenHands'
app server (``RemoteSandboxService``: ``/list``, ``/sessions/batch``). Requests allow
extra fields (clients send more than a prebuilt-only server uses); a field of the
wrong type is a 422, never a 500.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from imagefarm.settings import check_version
from .resolver import VERSION_ENV

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
#: ``resource_factor`` the clients send (1, 2, 4, 8) and the bound of the rest
FACTORS = (1, 8)

#: ``status``: what the runtime is (both clients attach on running/paused; V0 also
#: knows stopped; OpenHands' app server also maps ``error``)
Status = Literal["running", "paused", "stopped", "error"]
#: ``pod_status``: what the container is; both clients poll for ``ready`` and treat
#: pending/running/not found as transient, failed/unknown/crashloopbackoff as terminal
PodStatus = Literal["pending", "running", "ready", "failed", "crashloopbackoff", "unknown", "not found"]


class StartRequest(BaseModel):
    """``POST /start``. SDK: command is a string; V0: a list."""

    model_config = ConfigDict(extra="allow")

    image: str = Field(min_length=1, max_length=1024, description="base (r2e) or prebuilt reference")
    command: str | list[str] = Field(description="agent server command line (string or argv list)")
    working_dir: str | None = Field(None, max_length=4096)
    environment: dict[str, str] = Field(default_factory=dict)
    session_id: str = Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f/\\]+$")
    run_as_user: int | None = Field(None, ge=0, le=2**31)
    run_as_group: int | None = Field(None, ge=0, le=2**31)
    fs_group: int | None = Field(None, ge=0, le=2**31)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    runtime_class: str | None = None
    resource_factor: float = Field(1, description="CPU and memory units (clients send 1, 2, 4 or 8)")

    @field_validator("environment")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        """Names only in the message: a value may be a secret (names with a newline or
        other control characters are refused whole, never trimmed)."""
        bad = [k for k in env if not ENV_NAME.fullmatch(k)]
        if bad:
            raise ValueError(f"invalid environment variable names (expected {ENV_NAME.pattern}): "
                             f"{[k[:64] for k in bad[:5]]}")
        return env

    @field_validator("environment")
    @classmethod
    def _version(cls, env: dict[str, str]) -> dict[str, str]:
        """The agent-server version a client asks for is checked like the flag (empty: not asked)."""
        if env.get(VERSION_ENV):
            try:
                check_version(env[VERSION_ENV])
            except ValueError as exc:
                raise ValueError(f"environment {VERSION_ENV}: {str(exc)[:120]}") from None
        return env

    @property
    def agent_server_version(self) -> str | None:
        """The version asked for in ``environment`` (``VERSION_ENV``), or None."""
        return self.environment.get(VERSION_ENV) or None

    @field_validator("resource_factor")
    @classmethod
    def _factor(cls, f: float) -> float:
        """A tiny factor would become ``--cpus 1e-06 --memory 0m``, which podman reads as
        no limit at all: only the clients' range is accepted."""
        lo, hi = FACTORS
        if not lo <= f <= hi:  # NaN fails too
            raise ValueError(f"resource_factor must be between {lo} and {hi} (clients send 1, 2, 4 or 8; "
                             "each unit is --cpus-per-factor CPUs and --memory-mib-per-factor MiB)")
        return f

    @field_validator("command")
    @classmethod
    def _non_empty(cls, cmd: str | list[str]) -> str | list[str]:
        import shlex

        try:
            argv = shlex.split(cmd) if isinstance(cmd, str) else cmd
        except ValueError as exc:
            raise ValueError(f"command cannot be split into words: {exc}") from None
        if not argv or not argv[0].strip():
            raise ValueError("command is empty (its first word names the program to run)")
        return cmd


class RuntimeRef(BaseModel):
    """``POST /stop``, ``/pause``, ``/resume``: ``{"runtime_id": ...}``."""

    model_config = ConfigDict(extra="allow")
    runtime_id: str = Field(min_length=1, max_length=256)


class ContainerStatus(BaseModel):
    name: str = "agent-server"
    state: str
    ready: bool
    restart_count: int = 0
    exit_code: int | None = None
    reason: str | None = None


class RuntimeInfo(BaseModel):
    """One runtime, as ``/start``, ``/sessions/{id}``, ``/runtime/{id}`` and ``/list`` answer."""

    runtime_id: str
    session_id: str
    url: str = Field(description="agent server base URL (GET {url}/alive, {url}/health)")
    session_api_key: str = Field(description="send as X-Session-API-Key to the agent server")
    status: Status
    pod_status: PodStatus
    image: str = Field(description="the image as requested")
    prebuilt_image: str = Field(description="the pinned prebuilt image that runs")
    base_image: str | None = None
    work_hosts: dict[str, int] = Field(default_factory=dict)
    restart_count: int = 0
    restart_reasons: list[str] = Field(default_factory=list)
    container_statuses: list[ContainerStatus] = Field(default_factory=list)
    pod_logs: str | None = Field(None, description="last log lines when the container failed")
    run_as_user: str = Field(description="the user the container runs as ('image' = the image's own)")
    resource_factor: float = 1
    created_at: float
    last_activity: float


class RuntimeList(BaseModel):
    runtimes: list[RuntimeInfo]


class ActionResult(BaseModel):
    runtime_id: str
    status: Status
    session_api_key: str | None = None
    url: str | None = None


class ImageDetails(BaseModel):
    image: str
    prebuilt_image: str
    base_image: str | None = None
    image_size_bytes: int = 0
    upload_time: str = ""
    verified: bool = False
    agent_server_version: str | None = None


class ImageExists(BaseModel):
    exists: bool
    image: ImageDetails | None = None
    detail: str | None = Field(None, description="why not, and the command that builds it")


class RegistryPrefix(BaseModel):
    registry_prefix: str


class Health(BaseModel):
    status: str = "ok"
    server_id: str
    runtimes: int
    max_runtimes: int
    auth: bool


class ErrorBody(BaseModel):
    detail: str


class PrefetchRequest(BaseModel):
    """``POST /prefetch``: images (bases or prebuilt references) to pull ahead of the
    trainer, of ``recipe`` at ``agent_server_version`` (None: the server's), and ``warm``
    sandboxes per image to boot ahead (a matching ``/start`` is handed one at once).

    Answer: ``{"images": [{"image", "prebuilt_image", "node", "pull", "warm"}, ...]}``
    (``warm``: sandboxes being booted for that image on that node)."""

    images: list[str] = Field(min_length=1, max_length=10000)
    recipe: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    agent_server_version: str | None = Field(None, min_length=1, max_length=64)
    warm: int = Field(0, ge=0, le=64)

    @field_validator("agent_server_version")
    @classmethod
    def _version(cls, v: str | None) -> str | None:
        if v is not None:
            check_version(v)
        return v
