"""``imagefarm runtime serve``: the OpenHands remote runtime API, prebuilt images only."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

from imagefarm.errors import ConfigError
from imagefarm.runtime.config import FrontOptions
from imagefarm.settings import Settings
from ._app import app, console, friendly

_FRONT = FrontOptions(fleet_key="x" * 16)  # the defaults, stated once (runtime/fleet.py)

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
    agent_server_version: str = typer.Option(
        None, "--agent-server-version", metavar="VERSION",
        help="start images of this openhands-agent-server version unless a /start asks for another in its "
             "environment (IMAGEFARM_AGENT_SERVER_VERSION); default: the newest verified one of each base"),
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
    image_cache_gib: float = typer.Option(None, "--image-cache-gib",
                                          help="disk budget for images on this node; idle ones evicted LRU first"),
    fleet: bool = typer.Option(False, "--fleet", help="be the front of a fleet: runtimes run on the nodes that "
                                                     "join (`imagefarm runtime node --join URL`), none here"),
    fleet_key_file: Path = typer.Option(None, "--fleet-key-file",
                                        help="file holding the key nodes join with (else IMAGEFARM_FLEET_KEY)"),
    node_timeout: float = typer.Option(_FRONT.node_timeout, "--node-timeout",
                                       help="seconds without a node's report before its runtimes are failed"),
    placement: str = typer.Option(_FRONT.placement, "--placement", help="image (a node holding the image, else the "
                                                               "least loaded) | random (for comparison)"),
    payload: list[str] = typer.Option([], "--payload", metavar="RECIPE[@VERSION]",
                                      help="payload to pull at start-up, before the server reports ready (repeat; "
                                           "default: the settings' recipe and version; `none`: no pull)"),
    warm_idle_timeout: float = typer.Option(600, "--warm-idle-timeout",
                                            help="seconds a warm sandbox (POST /prefetch warm) waits for a start"),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Serve the runtime API (SDK APIRemoteWorkspace and V0 RemoteRuntime)."""
    from imagefarm.runtime import ServeConfig
    from imagefarm.runtime.serve import default_resolver, serve

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.load(to=to, agent_server_version=agent_server_version)
    config = ServeConfig(
        api_key=api_key, disable_auth=disable_auth, max_runtimes=max_runtimes,
        port_range=_port_range(port_range), idle_timeout=idle_timeout, publish_address=publish_address,
        public_host=public_host, cpus_per_factor=cpus_per_factor, memory_mib_per_factor=memory_per_factor,
        pids_limit=pids_limit, user_policy=user_policy, stop_on_exit=stop_on_exit,  # type: ignore[arg-type]
        image_cache_gib=image_cache_gib, payloads=_payloads(payload), warm_idle_timeout=warm_idle_timeout)
    front = None
    if not fleet:  # checked as a front would check them, so a typo is not silently ignored
        FrontOptions(fleet_key=_FRONT.fleet_key, node_timeout=node_timeout, placement=placement)
    if fleet:
        front = FrontOptions(fleet_key=_fleet_key(fleet_key_file), node_timeout=node_timeout, placement=placement)
    os.environ.pop("IMAGEFARM_RUNTIME_API_KEY", None)  # not inherited by podman and its children
    where = settings.state_dir / ("fleet" if fleet else "runtime")
    console.print(f"runtime server{' (fleet front)' if fleet else ''}: prebuilt images under {settings.to}, "
                  f"state in {where}")
    serve(settings, config, host=host, port=port, resolver=default_resolver(settings),
          url_file=url_file, public_host=public_host, log_level=log_level, front=front)


def _payloads(values: list[str]) -> tuple[str, ...] | None:
    """``--payload`` values: None (the settings' recipe) when not given, () for ``none``."""
    if not values:
        return None
    if values == ["none"]:
        return ()
    for v in values:
        name, _, version = v.partition("@")
        if not name or "/" in name or (_ and not version):
            raise ConfigError(f"--payload {v!r}: expected RECIPE or RECIPE@VERSION, e.g. default@1.58.2")
    return tuple(values)


def _fleet_key(path: Path | None) -> str:
    """The fleet key from a file or IMAGEFARM_FLEET_KEY (never argv); popped from the environment."""
    env = os.environ.pop("IMAGEFARM_FLEET_KEY", None)
    if path is not None:
        try:
            key = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--fleet-key-file {path}: {exc.strerror}") from None
    else:
        key = (env or "").strip()
    if len(key) < 16:  # FrontOptions checks too; a node has none
        raise ConfigError("a fleet key of at least 16 characters is required: IMAGEFARM_FLEET_KEY or "
                          "--fleet-key-file (the same on the front and every node)")
    return key


@runtime_app.command("node")
@friendly
def node_cmd(
    join: str = typer.Option(..., "--join", help="the front's URL (`imagefarm runtime serve --fleet`)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address this node's API and runtime ports listen on"),
    port: int = typer.Option(0, "--port", help="this node's API port (0: any free port)"),
    advertise: str = typer.Option(None, "--advertise", help="address the front and the trainer reach this node "
                                                            "at (default: --host, or this node's FQDN)"),
    fleet_key_file: Path = typer.Option(None, "--fleet-key-file", help="file holding the fleet key "
                                                                       "(else IMAGEFARM_FLEET_KEY)"),
    slots: int = typer.Option(None, "--slots", help="runtimes of resource_factor 1 this node takes "
                                                    "(default: from its CPUs and memory)"),
    image_cache_gib: float = typer.Option(None, "--image-cache-gib",
                                          help="disk budget for images; idle ones evicted LRU first"),
    prefetch: list[str] = typer.Option([], "--prefetch", help="image to pull before taking sandboxes (repeat; "
                                                              "one prebuilt image brings the payload layer)"),
    port_range: str = typer.Option("30000-39999", "--port-range", help="host ports runtimes are published on"),
    idle_timeout: float = typer.Option(3600, "--idle-timeout", help="remove runtimes idle this many seconds (0: never)"),
    user_policy: str = typer.Option("image", "--user-policy", help="image | requested (see `runtime serve`)"),
    cpus_per_factor: float = typer.Option(1.0, "--cpus-per-factor", help="--cpus per resource_factor unit (a slot)"),
    memory_per_factor: int = typer.Option(4096, "--memory-mib-per-factor", help="memory MiB per slot"),
    pids_limit: int = typer.Option(4096, "--pids-limit", help="process cap per runtime"),
    heartbeat: float = typer.Option(1.0, "--heartbeat", help="seconds between reports when nothing changes"),
    to: str = typer.Option(None, "--to", help="registry prefix of prebuilt images (IMAGEFARM_TO)"),
    payload: list[str] = typer.Option([], "--payload", metavar="RECIPE[@VERSION]",
                                      help="payload to pull at start-up, before the server reports ready (repeat; "
                                           "default: the settings' recipe and version; `none`: no pull)"),
    warm_idle_timeout: float = typer.Option(600, "--warm-idle-timeout",
                                            help="seconds a warm sandbox (POST /prefetch warm) waits for a start"),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Run runtimes on this node for a fleet's front (one per SLURM node, under srun)."""
    from imagefarm.runtime import ServeConfig
    from imagefarm.runtime.metrics import local_slots
    from imagefarm.runtime.node import NodeConfig
    from imagefarm.runtime.serve import advertised_url, default_resolver, serve

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not join.startswith(("http://", "https://")):
        raise ConfigError(f"--join {join!r}: expected the front's URL, http://HOST:PORT")
    if slots is not None and slots < 1:
        raise ConfigError("--slots must be at least 1")
    if not heartbeat > 0:
        raise ConfigError("--heartbeat must be a positive number of seconds")
    key = _fleet_key(fleet_key_file)
    os.environ.pop("IMAGEFARM_RUNTIME_API_KEY", None)  # the clients' key is the front's, not for podman
    settings = Settings.load(to=to)
    most = local_slots(cpus_per_factor, memory_per_factor)
    n = min(slots, most) if slots and most >= 1 else (slots or most)
    if slots and n < slots:
        console.print(f"runtime node: --slots {slots} capped at {n}: what this node's CPUs and memory hold "
                      f"at {cpus_per_factor:g} CPU(s) and {memory_per_factor} MiB a slot")
    if n < 1:
        raise ConfigError(f"this node has no slot: fewer than {cpus_per_factor:g} CPU(s) or "
                          f"{memory_per_factor} MiB (set --slots, or lower the per-factor sizes)")
    address = advertise or advertised_url(host, 1).split("//", 1)[1].rsplit(":", 1)[0].strip("[]")
    config = ServeConfig(
        api_key=key, max_runtimes=n, port_range=_port_range(port_range), idle_timeout=idle_timeout,
        publish_address=host, public_host=address, cpus_per_factor=cpus_per_factor,
        memory_mib_per_factor=memory_per_factor, pids_limit=pids_limit, user_policy=user_policy,  # type: ignore[arg-type]
        stop_on_exit=True, clean_start=True, image_cache_gib=image_cache_gib, payloads=_payloads(payload),
        warm_idle_timeout=warm_idle_timeout)
    node = NodeConfig(join=join.rstrip("/"), fleet_key=key, address=address, slots=n, heartbeat=heartbeat,
                      prefetch=list(prefetch))
    console.print(f"runtime node: {n} slot(s), runtimes at {address}, joining {join}, "
                  f"state in {settings.state_dir / 'runtime'}")
    serve(settings, config, host=host, port=port, resolver=default_resolver(settings),
          log_level=log_level, node=node)


@runtime_app.command("prefetch")
@friendly
def prefetch_cmd(
    url: str = typer.Option(..., "--url", envvar="RUNTIME_API_URL", help="the runtime server (front) URL"),
    api_key: str = typer.Option(None, "--api-key", envvar="IMAGEFARM_RUNTIME_API_KEY", show_envvar=True,
                                help="the server's key (prefer the variable: argv is visible)"),
    dataset: str = typer.Option(None, "--dataset", help="dataset whose instances' images to pull"),
    first: int = typer.Option(None, "--first", help="only the first N distinct images of the dataset"),
    image: list[str] = typer.Option([], "--image", help="an image to pull (repeat)"),
    wait: float = typer.Option(0, "--wait", help="seconds to keep asking while the server is not up "
                                                 "or no node has joined yet"),
    warm: int = typer.Option(0, "--warm", metavar="K", help="also boot K sandboxes per image ahead (K: the "
                                                            "samples per instance); a matching /start is "
                                                            "handed one at once"),
    recipe: str = typer.Option(None, "--recipe", help="the recipe of the images (default: the server's; v0 for "
                                                      "V0 RemoteRuntime trainers)"),
    agent_server_version: str = typer.Option(None, "--agent-server-version", metavar="VERSION",
                                             help="images of this openhands-agent-server version "
                                                  "(default: the server's)"),
) -> None:
    """Pull images onto the fleet's nodes ahead of the trainer, spread as its starts would be,
    and boot --warm K sandboxes of each."""
    import time

    import httpx

    from imagefarm.farm import catalog

    if first is not None and first < 1:
        raise ConfigError("--first must be at least 1")
    images = list(image)
    if dataset:
        images += [str(b) for b in catalog.load(dataset).limited(first).bases]
    if not images:
        raise ConfigError("nothing to prefetch: give --dataset or --image")
    if wait < 0:
        raise ConfigError("--wait must be a number of seconds, 0 or more")
    if not 0 <= warm <= 64:
        raise ConfigError(f"--warm {warm}: expected 0 to 64 sandboxes per image")
    if agent_server_version is not None:
        from imagefarm.settings import check_version

        try:
            check_version(agent_server_version)
        except ValueError as exc:
            raise ConfigError(f"--agent-server-version: {exc}") from None
    body = {"images": images, "warm": warm, "recipe": recipe, "agent_server_version": agent_server_version}
    deadline = time.monotonic() + wait
    while True:
        try:
            r = httpx.post(f"{url.rstrip('/')}/prefetch", json=body,
                           headers={"X-API-Key": api_key or ""}, timeout=600, trust_env=False)
        except httpx.HTTPError as exc:
            if time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise ConfigError(f"the runtime server at {url} did not answer: {exc}") from None
        if r.status_code in (429, 503) and time.monotonic() < deadline:
            time.sleep(2)
            continue
        break
    if r.status_code != 200:
        raise ConfigError(f"the runtime server refused the prefetch ({r.status_code}): {r.text[:500]}")
    rows = r.json()["images"]
    for row in rows:
        warm_note = f", {row.get('warm', 0)} warm" if warm else ""
        console.print(f"{row['image']} -> node {row['node']}: {'pulling' if row['pull'] else 'already there'}"
                      f"{warm_note}")
    console.print(f"{sum(1 for x in rows if x['pull'])} pull(s) started on "
                  f"{len({x['node'] for x in rows})} node(s)"
                  + (f"; {sum(x.get('warm', 0) for x in rows)} warm sandbox(es) booting" if warm else ""))
