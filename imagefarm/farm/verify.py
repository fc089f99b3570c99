"""Boot a prebuilt image and prove it serves: ``verify(settings, image_ref)``.

The image runs under podman exactly as a runtime would start it (its recipe's
``[image] command``, read from the image's recipe label: the agent server's
``/usr/local/bin/openhands-agent-server --port 60000``, or V0's ``micromamba run -n
openhands python -u -m openhands.runtime.action_execution_server 60000 ...``) with
``SESSION_API_KEY`` set (so the server binds 0.0.0.0), published on a free loopback
port. It passes when

1. the recipe's ``ready`` paths (the agent server's ``/alive`` and ``/health``, V0's
   ``/alive``) answer 2xx before the timeout;
2. a real command sent through the server's own API (the agent server's
   ``POST /api/bash/execute_bash_command``; V0's ``POST /execute_action`` with a
   ``run`` action, which goes through its tmux bash session), in ``/testbed`` when it
   exists, runs in the *base's* environment: ``python`` there is the base's venv (the
   image config's ``VIRTUAL_ENV``), never the payload's own interpreter.
3. the agent server's ``GET /server_info`` names the openhands-agent-server version the
   image's label (``dev.imagefarm.agent-server.version``, written by derive) says it
   holds: a payload built from another version than its recipe digest claims is caught
   here (V0's server has no such route).

Otherwise ``VerifyError`` says why: timeout, crash (with the container's last log
lines), wrong python. The container is always removed.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from imagefarm import oci
from imagefarm.host.containers import reserved_ports, run
from imagefarm.errors import ConfigError, ToolError, VerifyError
from imagefarm.names.reference import parse
from imagefarm.payload.recipe import Recipe, load_recipe, recipe_for
from imagefarm.settings import Settings

#: the port every recipe's ``[image] command`` serves on
PORT = 60000
LABEL = "imagefarm"


@dataclass(frozen=True)
class VerifyResult:
    image: str
    ok: bool
    alive_seconds: float           #: from `podman run` to the first 2xx of /alive
    total_seconds: float
    cwd: str
    command: str
    output: str
    expected_prefix: str | None    #: the base's VIRTUAL_ENV, when it has one
    checks: list[str] = field(default_factory=list)
    agent_server_version: str = ""  #: what the running server's /server_info says

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_of(config: dict[str, Any]) -> dict[str, str]:
    env = {}
    for item in (config.get("Config") or config.get("config") or {}).get("Env") or []:
        k, _, v = item.partition("=")
        env[k] = v
    return env


def pull(settings: Settings, image_ref: str, timeout: float = 900) -> dict[str, Any]:
    """Pull (if needed) and return ``podman image inspect`` of ``image_ref``."""
    tls = ["--tls-verify=false"] if parse(image_ref).registry.insecure(settings) else []
    try:
        run(settings, ["podman", "pull", "--quiet", *tls, image_ref], timeout=timeout)
        out = run(settings, ["podman", "image", "inspect", image_ref], timeout=60).stdout
    except ToolError as exc:
        raise VerifyError(f"cannot pull {image_ref}: {exc}") from None
    data = json.loads(out)
    return data[0] if isinstance(data, list) else data


def _recipe_of(settings: Settings, info: dict[str, Any]) -> Recipe:
    """The recipe the image's label names (derive writes it), else the settings' recipe."""
    labels = info.get("Labels") or (info.get("Config") or {}).get("Labels") or {}
    name = labels.get(oci.ANN_RECIPE)
    if name:
        try:
            return load_recipe(name, settings.recipes_dir)
        except ConfigError:
            pass
    return recipe_for(settings)


def _logs(settings: Settings, name: str, lines: int = 20) -> str:
    proc = run(settings, ["podman", "logs", "--tail", str(lines), name], check=False, timeout=30)
    return (proc.stdout + proc.stderr).strip() or "(no output)"


def _state(settings: Settings, name: str) -> tuple[str, int]:
    proc = run(settings, ["podman", "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name],
               check=False, timeout=30)
    parts = proc.stdout.split()
    if proc.returncode != 0 or len(parts) < 2:
        return "gone", -1
    return parts[0], int(parts[1])


def verify(
    settings: Settings,
    image_ref: str,
    *,
    timeout: float = 120.0,
    user: str | None = None,
    workdir: str | None = None,
    pull_timeout: float = 900,
) -> VerifyResult:
    """Boot ``image_ref`` and check the agent server answers and runs commands in the base.

    ``user``/``workdir`` start it the way APIRemoteWorkspace may (``user="10001"``,
    ``workdir="/"``). Raises ``VerifyError`` with the reason on any failure.
    """
    info = pull(settings, image_ref, pull_timeout)
    recipe = _recipe_of(settings, info)
    command = list(recipe.command)
    v0 = recipe.payload.launcher_style == "micromamba"
    env = _env_of(info)
    labels = info.get("Labels") or (info.get("Config") or {}).get("Labels") or {}
    claimed = labels.get(oci.ANN_AGENT_VERSION, "")
    venv = env.get("VIRTUAL_ENV") or None
    key = secrets.token_urlsafe(24)
    port = _free_port()
    name = f"imagefarm-verify-{secrets.token_hex(6)}"
    argv = ["podman", "run", "-d", "--name", name, "--label", f"{LABEL}=verify",
            "-p", f"127.0.0.1:{port}:{PORT}", *reserved_ports([PORT]),
            # the key by name only: podman takes the value from its own environment, so it is
            # never on a command line (ps, /proc/<pid>/cmdline) nor in an error message
            "-e", "SESSION_API_KEY", "-e", "LITELLM_LOCAL_MODEL_COST_MAP=True",
            "--entrypoint", command[0],
            *(["--user", user] if user else []), *(["--workdir", workdir] if workdir else []),
            image_ref, *command[1:]]
    t0 = time.monotonic()
    checks: list[str] = []
    try:
        try:
            run(settings, argv, timeout=120, env={"SESSION_API_KEY": key})
        except ToolError as exc:
            raise VerifyError(f"{image_ref}: the container did not start: {exc}") from None
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=10) as http:
            first, *more = recipe.ready
            alive = _wait(settings, http, name, image_ref, f"{base}{first}", t0, timeout)
            checks.append(f"{first} after {alive:.1f}s")
            for path in more:
                _wait(settings, http, name, image_ref, f"{base}{path}", t0, timeout)
                checks.append(f"{path} 2xx")
            headers = {"X-Session-API-Key": key}
            served = None if v0 else _server_version(http, f"{base}/server_info", headers, image_ref)
            if served is not None:
                if claimed and served != claimed:
                    raise VerifyError(f"{image_ref}: /server_info says openhands-agent-server {served}, but the "
                                      f"image's label {oci.ANN_AGENT_VERSION} says {claimed}: the payload is not "
                                      "the one its recipe names; rebuild it (`imagefarm payload build --force`)")
                checks.append(f"/server_info: openhands-agent-server {served}"
                              + (" (= the image's label)" if claimed else ""))

            def post(path: str, body: dict[str, Any], command: str) -> dict[str, Any]:
                """``body`` to the server's own API; VerifyError (with the log) unless 2xx."""
                what = path.rsplit("/", 1)[1]
                try:
                    r = http.post(f"{base}{path}", json=body, headers=headers, timeout=90)
                except httpx.HTTPError as exc:
                    raise VerifyError(f"{image_ref}: {what} failed: {exc}; "
                                      f"container log:\n{_logs(settings, name)}") from None
                if r.status_code // 100 != 2:
                    raise VerifyError(f"{image_ref}: {what} `{command}` answered "
                                      f"{r.status_code}: {r.text[:500]}; container log:\n{_logs(settings, name)}")
                return r.json()

            def agent_sh(command: str, cwd: str | None) -> tuple[int, str, str]:
                body: dict[str, Any] = {"command": command, "timeout": 60}
                if cwd:
                    body["cwd"] = cwd
                d = post("/api/bash/execute_bash_command", body, command)
                return int(d.get("exit_code", -1)), (d.get("stdout") or ""), (d.get("stderr") or "")

            def v0_sh(command: str, cwd: str | None) -> tuple[int, str, str]:
                # a CmdRunAction as the V0 client serialises it; the observation's
                # content is the pane's output (stdout and stderr together)
                action = {"action": "run", "timeout": 60,
                          "args": {"command": f"cd {cwd} && {command}" if cwd else command, "is_input": False}}
                d = post("/execute_action", {"action": action}, command)
                code = ((d.get("extras") or {}).get("metadata") or {}).get("exit_code", -1)
                content = d.get("content") or ""
                return int(code if code is not None else -1), content, content

            sh = v0_sh if v0 else agent_sh

            code, out, err = sh("if [ -d /testbed ]; then echo yes; else echo no; fi", None)
            if code != 0:
                raise VerifyError(f"{image_ref}: a shell command through the agent server failed "
                                  f"(exit {code}): {err.strip()[:500]}")
            cwd = "/testbed" if out.strip() == "yes" else ""
            if venv:
                command = "python -c 'import sys; print(sys.prefix)'"
            else:
                command = ("if command -v python3 >/dev/null 2>&1; then python3 -c 'import sys; print(sys.prefix)'; "
                           "else echo ok; pwd; fi")
            code, out, err = sh(command, cwd or None)
            # V0's tmux session now and then reads a finished command's pane before its
            # output shows (exit 0, empty content; seen once in five boots here): ask again
            for _ in range(2):
                if not (v0 and code == 0 and not out.strip()):
                    break
                checks.append("V0 answered empty output: asked again")
                code, out, err = sh(command, cwd or None)
            checks.append(f"`{command}` exit {code}")
            got = out.strip().splitlines()
            if code != 0:
                raise VerifyError(f"{image_ref}: `{command}` failed through the agent server (exit {code}): "
                                  f"{(err or out).strip()[:500]}")
            if venv and (not got or got[0] != venv):
                raise VerifyError(f"{image_ref}: wrong python in the agent's shell: sys.prefix is "
                                  f"{got[0] if got else '(nothing)'!r}, expected the base's venv {venv!r}")
            if any(line.startswith(recipe.payload.prefix) for line in got):
                raise VerifyError(f"{image_ref}: wrong python in the agent's shell: the payload's own "
                                  f"interpreter ({got[0]}) leaks into the base's environment")
            if not got:
                raise VerifyError(f"{image_ref}: `{command}` printed nothing")
            checks.append(f"agent shell sees {got[0]}")
            return VerifyResult(image_ref, True, round(alive, 2), round(time.monotonic() - t0, 2),
                                cwd or "(server default)", command, out.strip(), venv, checks, served or "")
    finally:
        run(settings, ["podman", "rm", "-f", "-t", "0", name], check=False, timeout=60)


def _server_version(http: httpx.Client, url: str, headers: dict[str, str], image_ref: str) -> str:
    """The ``version`` field of the agent server's ``/server_info``."""
    try:
        r = http.get(url, headers=headers, timeout=30)
        version = r.json().get("version") if r.status_code // 100 == 2 else None
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        raise VerifyError(f"{image_ref}: /server_info failed: {exc}") from None
    if not isinstance(version, str) or not version:
        raise VerifyError(f"{image_ref}: /server_info answered {r.status_code} without a version: {r.text[:300]}")
    return version


def _wait(settings: Settings, http: httpx.Client, name: str, image_ref: str, url: str,
          t0: float, timeout: float) -> float:
    """Seconds from t0 until ``url`` answers 2xx; VerifyError on crash or timeout."""
    last = ""
    next_state = 0.0
    while True:
        now = time.monotonic()
        if now - t0 > timeout:
            raise VerifyError(f"{image_ref}: timeout: {url.rsplit('/', 1)[-1]} did not answer within "
                              f"{timeout:.0f}s ({last or 'no answer'}); container log:\n{_logs(settings, name)}")
        if now >= next_state:
            status, code = _state(settings, name)
            if status not in ("running", "created", "configured", "initialized"):
                raise VerifyError(f"{image_ref}: crash: the agent server exited (status {status}, code {code}) "
                                  f"before answering; last log lines:\n{_logs(settings, name)}")
            next_state = now + 1.0
        try:
            r = http.get(url, timeout=2)
            if r.status_code // 100 == 2:
                return time.monotonic() - t0
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.1)
