"""``PodmanBackend`` against real podman: what a cancelled verb leaves on the host.

Counted from the host's own records: the process table (conmon and ``runc init`` name
the container they serve) and podman's container list.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from imagefarm.host.containers import run
from imagefarm.runtime.backend import ContainerSpec, PodmanBackend
from imagefarm.runtime.ports import PortPool

pytestmark = pytest.mark.timeout(300)


def _processes_of(container: str) -> list[str]:
    """conmon serving ``container`` (it names it with ``-n``) and what runs under it
    (``runc init``, the container's own processes), as command lines."""
    procs = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                argv = (p / "cmdline").read_bytes().split(b"\0")
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            procs[int(p.name)] = (ppid, b" ".join(argv).decode(errors="replace")[:160], argv)
    roots = {pid for pid, (_, _, argv) in procs.items()
             if argv and argv[0].endswith(b"conmon") and container.encode() in argv}
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, (ppid, _, _) in procs.items() if ppid in frontier} - found
        found |= frontier
    return sorted(procs[pid][1] for pid in found)


def test_a_podman_run_cancelled_between_create_and_start_leaves_no_container_behind(rt_settings, prebuilt):
    """A start cancelled mid-``podman run`` (a /stop while pending, a warm sandbox giving up
    its slot, a server shutting down): killing podman between runc create and runc start
    left conmon and ``runc init`` running for ever, holding the port and the address, with
    no podman record left to remove them by. The window is short (podman returns soon
    after conmon appears), so the cancel is tried until it lands inside it."""
    image = f"{prebuilt['busybox'].image.rsplit(':', 1)[0]}@{prebuilt['busybox'].digest}"
    port = PortPool((45000, 45999), "127.0.0.1").take(())
    landed: dict[str, list[str]] = {}  # container -> conmon's command line seen mid-run

    async def attempt(backend: PodmanBackend, name: str) -> None:
        spec = ContainerSpec(name=name, image=image, argv=["/usr/local/bin/openhands-agent-server", "--port", "60000"],
                             env={"SESSION_API_KEY": "k"}, labels={"imagefarm.test": "cancel"},
                             publish=[("127.0.0.1", port, 60000)])
        task = asyncio.create_task(backend.run(spec))
        seen: list[str] = []
        while not seen and not task.done():
            seen = _processes_of(name)
            await asyncio.sleep(0.001)
        if task.done():  # podman was quicker than this poll: not a cancel mid-run
            await task
        else:
            landed[name] = seen
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await backend.remove(name)  # what the server does next with a cancelled start

    async def scenario() -> None:
        backend = PodmanBackend(rt_settings)
        if not await backend.image_exists(image):
            await backend.pull(image, tls_verify=False)
        for _ in range(20):
            await attempt(backend, f"imagefarm-cancel-{uuid.uuid4().hex[:10]}")
            if landed:
                return

    asyncio.run(scenario())
    assert landed, "no cancel landed between conmon's start and podman run's return in 20 tries"
    for name, seen in landed.items():
        assert any("conmon" in p for p in seen), seen
        assert _processes_of(name) == [], name
        listed = run(rt_settings, ["podman", "ps", "--all", "--filter", f"name={name}", "--format", "{{.Names}}"])
        assert listed.stdout.split() == [], name


#: in the container: dial the agent port as rootlessport does (Go: no SO_REUSEADDR), then
#: bind it as uvicorn does (SO_REUSEADDR)
DIAL_THEN_SERVE = """
import socket, sys, time
c = socket.socket()
try:
    c.connect(("127.0.0.1", 60000))
    print("dial: connected from", c.getsockname(), flush=True)
except OSError as exc:
    print("dial:", exc, flush=True)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("0.0.0.0", 60000))
    s.listen()
except OSError as exc:
    print("serve:", exc, flush=True)
    sys.exit(3)
print("serve: listening", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("through", ["backend", "plain-podman"])
def test_a_dial_inside_the_container_never_takes_the_agent_port(rt_settings, prebuilt, through):
    """Rootless podman dials each connection to a published port from inside the
    container's own network namespace; before the agent server listens, a dial whose
    ephemeral source port is the agent's port connects to itself and holds it, and the
    agent server then fails with "address already in use" (seen: 1 start in 27, the
    server probing every 20 ms while the agent boots). Here the container's ephemeral
    range is narrowed to that one port, so the self-connect is certain rather than rare:
    a plain ``podman run`` shows it land; the backend reserves the agent port in the
    container's namespace (``ip_local_reserved_ports``), so the dial finds no port and
    the server binds."""
    image = f"{prebuilt['r2e'].image.rsplit(':', 1)[0]}@{prebuilt['r2e'].digest}"
    name = f"imagefarm-selfconnect-{uuid.uuid4().hex[:10]}"
    port = PortPool((45000, 45999), "127.0.0.1").take(())
    narrow = ["--sysctl", "net.ipv4.ip_local_port_range=60000 60000"]
    argv = ["/usr/bin/python3", "-c", DIAL_THEN_SERVE]

    async def scenario() -> str:
        backend = PodmanBackend(rt_settings)
        if not await backend.image_exists(image):
            await backend.pull(image, tls_verify=False)
        try:
            if through == "backend":
                await backend.run(ContainerSpec(name=name, image=image, argv=argv, env={}, labels={},
                                                publish=[("127.0.0.1", port, 60000)], extra=narrow))
            else:
                run(rt_settings, ["podman", "run", "--detach", "--name", name, "--publish", f"127.0.0.1:{port}:60000",
                                  *narrow, "--entrypoint", argv[0], image, *argv[1:]])
            for _ in range(100):
                logs = await backend.logs(name)
                if "serve:" in logs:
                    return logs
                await asyncio.sleep(0.1)
            return logs
        finally:
            await backend.remove(name)

    logs = asyncio.run(scenario())
    if through == "backend":
        assert "serve: listening" in logs and "dial: connected" not in logs, logs
    else:  # the fault, shown to land: the dial connected to itself and the bind failed
        assert "dial: connected from ('127.0.0.1', 60000)" in logs and "Address already in use" in logs, logs
