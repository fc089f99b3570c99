"""Runtime server tests: real podman, real uvicorn, real registry, real derive and lookup.

The "prebuilt" images here carry a STAND-IN agent server, not the real one: a
``#!/bin/sh`` script at ``/usr/local/bin/openhands-agent-server`` that serves
``/alive`` and ``/health`` with busybox httpd. It is appended to fixture bases with
the project's own derive (``imagefarm.derive.Appender``) under the default recipe's
name and digest, so ``imagefarm.serve.lookup.Lookup`` finds them exactly as it finds real
prebuilt images. Like the real server, it binds 0.0.0.0 only when
``SESSION_API_KEY`` is set (else loopback, unreachable through the published port).
``STANDIN_CRASH`` in the environment makes it print lines and exit 3.
The real agent-server images are used by the end-to-end test of the lead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import httpx
import pytest

from imagefarm import oci
from imagefarm.host.samples import R2E_REPOS
from imagefarm.host.rootfs import busybox_binary

from rtkit import API_KEY, STANDIN_AGENT_SERVER, CliServer


@pytest.fixture(scope="session")
def standin_layer(settings, tmp_path_factory) -> oci.Layer:
    busybox = busybox_binary(settings.cache_dir)
    ok = b'{"status":"ok"}\n'
    entries = [oci.dir_entry(d) for d in ("usr", "usr/local", "usr/local/bin", "opt", "opt/standin-www")]
    entries += [
        ("usr/local/bin/busybox", busybox, None),
        oci.file_entry("usr/local/bin/openhands-agent-server", STANDIN_AGENT_SERVER, 0o755),
        oci.file_entry("opt/standin-www/alive", ok),
        oci.file_entry("opt/standin-www/health", ok),
        oci.file_entry("opt/standin-www/STAND-IN", b"not the real agent server\n"),
    ]
    return oci.write_layer(entries, tmp_path_factory.mktemp("standin"))


@pytest.fixture(scope="session")
def rt_to(registry) -> str:
    return f"{registry.host}/prebuilt"


@pytest.fixture(scope="session")
def rt_settings(settings, rt_to):
    """The session settings (shared podman storage) with ``to`` at the test registry."""
    return settings.model_copy(update={"to": rt_to})


@pytest.fixture(scope="session")
def prebuilt(rt_settings, fixtures, standin_layer, rt_to):
    """Derive the stand-in onto a busybox base and an r2e base: {"busybox": r, "r2e": r}."""
    from imagefarm.derive import Appender, AppendPayload
    from imagefarm.payload.recipe import recipe_for

    recipe = recipe_for(rt_settings)
    payload = AppendPayload(standin_layer, recipe.name, recipe.digest, recipe.agent_server_version, ())
    busybox = fixtures.busybox_base(repo="fixtures/runtime-busybox", tag="1")
    r2e = fixtures.r2e_base(R2E_REPOS[2])
    with Appender(rt_settings) as appender:
        out = {"busybox": appender.derive(busybox.ref, payload, to=rt_to),
               "r2e": appender.derive(r2e.ref, payload, to=rt_to)}
    out["busybox_base"], out["r2e_base"] = busybox.ref, r2e.ref
    # published as `imagefarm payload push` does: every server pulls it at start-up
    from imagefarm.payload.remote import push
    from imagefarm.registry import RegistryClient

    with RegistryClient(rt_settings) as client:
        out["payload_image"], out["payload_manifest"], _ = push(client, payload, rt_to)
    out["payload_layer"] = standin_layer.digest
    return out


@pytest.fixture(scope="session")
def sdk_image(rt_settings, fixtures, payload, rt_to):
    """An r2e base with the REAL agent-server payload appended: (base ref, DeriveResult)."""
    from imagefarm.derive import Appender, AppendPayload
    from imagefarm.payload.recipe import recipe_for

    base = fixtures.r2e_base(R2E_REPOS[4], "8" * 40)
    with Appender(rt_settings) as appender:
        return base.ref, appender.derive(base.ref, AppendPayload.of(payload, recipe_for(rt_settings)), to=rt_to)


@pytest.fixture(scope="session")
def lookup(rt_settings):
    from imagefarm.serve.lookup import Lookup

    lk = Lookup(rt_settings)
    yield lk
    lk.close()


@pytest.fixture
def server_factory(rt_settings, lookup, tmp_path):
    """``with server_factory(**config) as srv:`` a real server in a thread (Lookup resolver)."""
    from imagefarm.runtime import ServeConfig
    from imagefarm.runtime.serve import ServerThread

    made = []

    @contextlib.contextmanager
    def make(resolver=None, **overrides):
        lo = 20000 + (os.getpid() * 7 + len(made) * 113) % 20000
        cfg = dict(api_key=API_KEY, port_range=(lo, lo + 99), state_dir=tmp_path / f"rt{len(made)}",
                   monitor_interval=0.5, memory_mib_per_factor=512)
        cfg.update(overrides)
        srv = ServerThread(rt_settings, ServeConfig(**cfg), resolver=resolver or lookup)
        made.append(srv)
        with srv:
            try:
                yield srv
            finally:  # leave nothing behind: every runtime of this server is stopped
                for rid in list(srv.manager.records):
                    httpx.post(f"{srv.url}/stop", json={"runtime_id": rid}, headers={"X-API-Key": API_KEY},
                               timeout=60)

    return make


@pytest.fixture
def client():
    with httpx.Client(headers={"X-API-Key": API_KEY}, timeout=60) as c:
        yield c


@pytest.fixture
def cli_server(rt_settings, tmp_path):
    """Factory of CLI servers sharing the session's state dir (and so its pulled images);
    their runtime state is ``<state_dir>/runtime``."""
    made = []

    def make(extra=()):
        srv = CliServer(rt_settings, rt_settings.state_dir / "runtime", "41000-41099", tmp_path, extra)
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.kill(signal.SIGTERM)


FLEET_KEY = "fleet-test-key-3c9a51d2e8"


@pytest.fixture
def fleet_factory(rt_settings, lookup, tmp_path):
    """``with fleet_factory(nodes=2, slots=2) as (front, nodes):`` a front and node processes
    in threads of this process, each node with its own podman storage and state
    (``tmp_path/nodeN``), its API and runtimes on its own loopback address 127.0.1.N."""
    from imagefarm.runtime import ServeConfig
    from imagefarm.runtime.config import FrontOptions
    from imagefarm.runtime.node import NodeConfig
    from imagefarm.runtime.serve import ServerThread

    class Running:
        def __init__(self, front, nodes, front_cfg, opts):
            self.front, self.nodes, self._cfg, self._opts = front, nodes, front_cfg, opts

        def restart_front(self):
            """Stop the front (its runtimes keep running on the nodes) and start it again
            on the same port and state."""
            port = int(self.front.url.rsplit(":", 1)[1])
            self.front.__exit__(None, None, None)
            self.front = ServerThread(rt_settings, self._cfg, resolver=lookup, port=port, front=self._opts)
            self.front.__enter__()
            return self.front

    @contextlib.contextmanager
    def make(nodes=2, slots=2, node_timeout=3.0, cache_gib=None, placement="image", prefetch=()):
        front_cfg = ServeConfig(api_key=API_KEY, state_dir=tmp_path / "front", monitor_interval=0.5)
        opts = FrontOptions(fleet_key=FLEET_KEY, node_timeout=node_timeout, placement=placement)
        with contextlib.ExitStack() as stack:
            front = ServerThread(rt_settings, front_cfg, resolver=lookup, front=opts).__enter__()
            made = []
            for i in range(1, nodes + 1):
                addr = f"127.0.1.{i}"
                st = rt_settings.model_copy(update={"state_dir": tmp_path / f"node{i}"})
                lo = 20000 + (os.getpid() * 7 + i * 331) % 20000
                cfg = ServeConfig(api_key=FLEET_KEY, max_runtimes=slots, port_range=(lo, lo + 49),
                                  publish_address=addr, public_host=addr, monitor_interval=0.5,
                                  memory_mib_per_factor=512, stop_on_exit=True, clean_start=True,
                                  image_cache_gib=cache_gib)
                node = NodeConfig(join=front.url, fleet_key=FLEET_KEY, address=addr, slots=slots,
                                  heartbeat=0.5, prefetch=list(prefetch))
                made.append(stack.enter_context(ServerThread(st, cfg, resolver=lookup,
                                                             host=addr, node=node)))
            running = Running(front, made, front_cfg, opts)
            deadline = time.monotonic() + 60
            while len([n for n in front.manager.nodes.values() if n.ready]) < nodes:
                assert time.monotonic() < deadline, "nodes did not join the front"
                time.sleep(0.05)
            try:
                yield running
            finally:
                for rid in list(running.front.manager.records):
                    httpx.post(f"{running.front.url}/stop", json={"runtime_id": rid},
                               headers={"X-API-Key": API_KEY}, timeout=60)
                running.front.__exit__(None, None, None)

    return make
