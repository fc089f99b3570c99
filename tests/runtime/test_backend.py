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
    no podman record left to remove them by."""
    image = f"{prebuilt['busybox'].image.rsplit(':', 1)[0]}@{prebuilt['busybox'].digest}"
    name = f"imagefarm-cancel-{uuid.uuid4().hex[:10]}"
    port = PortPool((45000, 45999), "127.0.0.1").take(())
    seen_mid_run: list[str] = []

    async def scenario() -> None:
        backend = PodmanBackend(rt_settings)
        if not await backend.image_exists(image):
            await backend.pull(image, tls_verify=False)
        spec = ContainerSpec(name=name, image=image, argv=["/usr/local/bin/openhands-agent-server", "--port", "60000"],
                             env={"SESSION_API_KEY": "k"}, labels={"imagefarm.test": "cancel"},
                             publish=[("127.0.0.1", port, 60000)])
        task = asyncio.create_task(backend.run(spec))
        # the fault lands mid-run: conmon serves the container, and `podman run` has not returned
        while not seen_mid_run:
            assert not task.done(), "podman run returned before its container's conmon was seen"
            seen_mid_run.extend(_processes_of(name))
            await asyncio.sleep(0.002)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await backend.remove(name)  # what the server does next with a cancelled start

    asyncio.run(scenario())
    assert any("conmon" in p for p in seen_mid_run), seen_mid_run
    assert _processes_of(name) == []
    listed = run(rt_settings, ["podman", "ps", "--all", "--filter", f"name={name}", "--format", "{{.Names}}"]).stdout
    assert listed.split() == []
