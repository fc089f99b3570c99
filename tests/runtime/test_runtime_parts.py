"""Units of the runtime's parts (images, launcher, upkeep, admission, the service shape).

The integration suites reach these parts through real podman; here each part's own
edge cases run against a recording stand-in for podman (``FakePodman``), in
milliseconds.
"""

from __future__ import annotations

import ast
import asyncio
import time
from pathlib import Path

import httpx
import pytest

from imagefarm.runtime.backend import BackendError, ContainerInfo, ImageInfo
from imagefarm.runtime.config import ServeConfig
from imagefarm.runtime.errors import CapacityFull
from imagefarm.runtime.images import NodeImages
from imagefarm.runtime.launcher import Launcher
from imagefarm.runtime.models import StartRequest
from imagefarm.runtime.placement import NodeView, admits, place
from imagefarm.runtime.ports import PortPool
from imagefarm.runtime.records import Records
from imagefarm.runtime.state import Record, Store
from imagefarm.runtime.upkeep import Upkeep

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"
D = "sha256:" + "b" * 64


class FakePodman:
    """Records every call; ``fail_run`` pops the errors ``run`` raises first."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.stored: dict[str, ImageInfo] = {}
        self.containers: dict[str, ContainerInfo] = {}
        self.fail_run: list[BackendError] = []
        self.cpu: dict[str, float] = {}
        self.pull_gate = asyncio.Event()
        self.pull_gate.set()

    async def image_exists(self, image):
        return image in self.stored

    async def pull(self, image, *, tls_verify=True):
        self.calls.append(("pull", image))
        await self.pull_gate.wait()
        self.stored[image] = ImageInfo(id=image.split("@")[0], names=(image,), size=100)

    async def images(self):
        return list(self.stored.values())

    async def image_remove(self, image_id):
        self.calls.append(("rmi", image_id))
        for k, v in list(self.stored.items()):
            if v.id == image_id:
                del self.stored[k]
        return True

    async def image_inspect(self, image):
        return {"Config": {"User": ""}}

    async def run(self, spec):
        self.calls.append(("run", spec.name, spec.working_dir, spec.publish[0][1]))
        if self.fail_run:
            raise self.fail_run.pop(0)
        self.containers[spec.name] = ContainerInfo(spec.name, spec.name, "running", None, dict(spec.labels))
        return spec.name

    async def remove(self, *names):
        self.calls.append(("rm", *names))
        for n in names:
            self.containers.pop(n, None)

    async def list(self, labels):
        return [c for c in self.containers.values() if all(c.labels.get(k) == v for k, v in labels.items())]

    async def inspect(self, name):
        return self.containers.get(name)

    async def logs(self, name, tail=50):
        return "last words\n"

    async def cpu_times(self, names):
        return {n: self.cpu.get(n, 0.0) for n in names}


def settings(tmp_path):
    from imagefarm.settings import Settings

    return Settings.load(to="127.0.0.1:5999/prebuilt").model_copy(update={"state_dir": tmp_path})


def record(rid: str, *, factor: float = 1.0, status: str = "running", pod: str = "ready", port: int = 30000,
           image: str = f"r.io/p/x@{D}") -> Record:
    now = time.time()
    return Record(rid, f"s-{rid}", f"imagefarm-rt-{rid}", "x", image, None, port, 60000, f"http://h:{port}",
                  "key", None, status, pod, now, now, resource_factor=factor)


# -- admission: one rule, front and node agree ---------------------------------------------------
@pytest.mark.parametrize("used, factor, fits", [(0, 8, True), (0.25, 8, False), (7, 1, True), (8, 1, False),
                                                 (6, 2, True), (6.5, 2, False)])
def test_front_and_node_agree_at_the_edge(tmp_path, used, factor, fits):
    """8 slots: the front's placement (``Fleet``'s own views) and the node's ``admit``
    give the same answer for the same occupancy, at the edge included (factor 8)."""
    from imagefarm.runtime.config import FrontOptions
    from imagefarm.runtime.fleet import Fleet, FrontRecord
    from imagefarm.runtime.nodes import Node
    from imagefarm.runtime.manager import RuntimeManager

    cfg = ServeConfig(api_key="k", max_runtimes=8, state_dir=tmp_path / "node")
    node = RuntimeManager(settings(tmp_path), FakePodman(), resolver=None, config=cfg)
    front = Fleet(settings(tmp_path), None, ServeConfig(api_key="k", state_dir=tmp_path / "front"),
                  FrontOptions(fleet_key="f" * 16))
    front.nodes["n1"] = Node("n1", "http://n1", "n1", slots=8, ready=True)
    if used:
        node.records.add(record("aa", factor=used))
        now = time.time()
        front.records.add(FrontRecord("aa", "s-aa", "n1", "x", f"r.io/p/x@{D}", None, used, now, now))
    front_says = front._place(f"r.io/p/y@{D}", factor, set()) is not None
    try:
        node.admit(factor)
        node_says = True
    except CapacityFull:
        node_says = False
    assert front_says == node_says == fits == admits(8, used, factor)


def test_placement_prefers_a_node_with_a_warm_sandbox():
    img = f"r.io/p/x@{D}"
    a = NodeView("a", 8, 0, frozenset({img}))
    b = NodeView("b", 8, 4, frozenset({img}), warm=frozenset({img}))
    assert place([a, b], img, 1).node_id == "b"
    assert place([a, b], "other", 1).node_id == "a"


# -- the shape: one service, no duck typing --------------------------------------------------------
def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}


def test_the_app_and_metrics_use_the_service_alone():
    from imagefarm.runtime.fleet import Fleet
    from imagefarm.runtime.manager import RuntimeManager
    from imagefarm.runtime.service import RuntimeService

    verbs = [n for n, v in vars(RuntimeService).items() if callable(v) and not n.startswith("_")]
    assert len(verbs) > 15
    for cls in (RuntimeManager, Fleet):
        missing = [m for m in verbs if not callable(getattr(cls, m, None))]
        assert missing == [], (cls, missing)
    for name in ("app.py", "metrics.py"):
        text = (RUNTIME / name).read_text()
        assert "hasattr(manager" not in text and "manager.records" not in text and "by_session." not in text
    for front_part in ("fleet.py", "nodes.py", "frontapi.py"):  # the front never reaches into a node's manager
        assert "manager" not in _imports(RUNTIME / front_part), front_part
    assert not (RUNTIME / "launch.py").exists()


# -- images --------------------------------------------------------------------------------------
def test_images_pull_once_for_concurrent_waiters_and_evict_lru(tmp_path):
    async def go():
        pod = FakePodman()
        store = Store(tmp_path / "st")
        in_use: set[str] = set()
        imgs = NodeImages(settings(tmp_path), pod, store, in_use=lambda: in_use, budget_bytes=250)
        a, b, c = (f"127.0.0.1:5999/p/{n}@{D}" for n in "abc")
        pod.pull_gate.clear()
        waits = [asyncio.create_task(imgs.ensure(a, size=100)) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert imgs.pulling() == {a}
        pod.pull_gate.set()
        assert await asyncio.gather(*waits) == [True, True, True]
        assert [x for x in pod.calls if x[0] == "pull"] == [("pull", a)]
        assert await imgs.ensure(a) is False  # present: nothing asked of the registry
        await imgs.ensure(b, size=100)
        in_use.add(a)  # a runs: b (idle, least recently used) goes to make room for c
        await imgs.ensure(c, size=100)
        assert [x for x in pod.calls if x[0] == "rmi"] == [("rmi", b.split("@")[0])]
        assert imgs.present == {a, c} and imgs.stats.evictions == 1 and imgs.stats.pulls == 3
        with pytest.raises(BackendError, match="Never"):
            await imgs.ensure(b, policy="Never")
    asyncio.run(go())


# -- launcher ------------------------------------------------------------------------------------
def _launcher(tmp_path, pod, ready=True):
    cfg = ServeConfig(api_key="k", port_range=(40100, 40199), state_dir=tmp_path / "st")
    store = Store(tmp_path / "st")
    records = Records(store)
    imgs = NodeImages(settings(tmp_path), pod, store, in_use=lambda: set())
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda req: httpx.Response(200 if ready else 503)))
    seen: list[tuple[str, float]] = []
    launcher = Launcher(server_id="srv", backend=pod, config=cfg, images=imgs, ports=PortPool(cfg.port_range, "127.0.0.1"),
                        records=records, http=http, on_ready=[lambda rec, s: seen.append((rec.runtime_id, s))])
    return launcher, records, seen


def test_launcher_falls_back_on_a_missing_workdir_and_a_taken_port_then_reports_ready(tmp_path):
    async def go():
        pod = FakePodman()
        pod.stored[f"r.io/p/x@{D}"] = ImageInfo("i", (f"r.io/p/x@{D}",), 1)
        pod.fail_run = [BackendError("no workdir", BackendError.WORKDIR_MISSING),
                        BackendError("taken", BackendError.PORT_IN_USE)]
        launcher, records, seen = _launcher(tmp_path, pod)
        rec = record("r1", pod="pending", port=40100)
        records.add(rec)
        req = StartRequest(image="x", command="srv --port 60000", working_dir="/nope", session_id="s-r1")
        launcher.launch(rec, req, ["srv", "--port", "60000"])
        await launcher.tasks["r1"]
        runs = [c for c in pod.calls if c[0] == "run"]
        assert [r[2] for r in runs] == ["/nope", None, None]  # the image's own working dir after the refusal
        assert runs[1][3] != runs[2][3] and rec.host_port == runs[2][3]  # a new port after the clash
        assert rec.pod_status == "ready" and [s[0] for s in seen] == ["r1"] and not launcher.busy("r1")
    asyncio.run(go())


def test_launcher_reports_an_exit_with_log_lines_and_oom_for_137(tmp_path):
    async def go():
        pod = FakePodman()
        launcher, records, seen = _launcher(tmp_path, pod, ready=False)
        rec = record("r2", pod="running")
        records.add(rec)
        pod.containers[rec.container] = ContainerInfo("c", rec.container, "exited", 137, {})
        await launcher.mark_exited(rec)
        assert rec.status == "error" and rec.pod_status == "crashloopbackoff" and "OOM" in rec.reason
        assert rec.pod_logs == "last words" and ("rm", rec.container) in pod.calls and rec.extra["removed"]
        assert seen == []
    asyncio.run(go())


# -- upkeep --------------------------------------------------------------------------------------
def test_upkeep_notices_an_exit_and_reaps_an_idle_runtime_by_cpu_time(tmp_path):
    async def go():
        pod = FakePodman()
        launcher, records, _ = _launcher(tmp_path, pod, ready=False)
        stopped: list[str] = []

        async def stop(rid, why="stopped"):
            stopped.append(rid)
            records.forget(rid)

        cfg = ServeConfig(api_key="k", idle_timeout=10, state_dir=tmp_path / "st")
        up = Upkeep(server_id="srv", backend=pod, config=cfg, records=records, launcher=launcher,
                    http=launcher.http, stop=stop)
        dead, idle, busy = record("d1"), record("i1"), record("b1")
        for r in (dead, idle, busy):
            records.add(r)
        for r in (idle, busy):
            pod.containers[r.container] = ContainerInfo(r.container, r.container, "running", None,
                                                        {"imagefarm.runtime.server": "srv",
                                                         "imagefarm.runtime.id": r.runtime_id})
        await up._monitor_once()
        assert dead.status == "error" and "disappeared" in dead.reason
        idle.last_activity = busy.last_activity = time.time() - 60
        await up._reap_once()  # first CPU sample: nobody reaped yet
        assert stopped == []
        pod.cpu[busy.container] = 5.0  # busy used CPU since; idle did not
        await up._reap_once()
        assert stopped == ["i1"] and busy.runtime_id in records
    asyncio.run(go())


# -- warm pool -------------------------------------------------------------------------------------
def test_warm_pool_hands_over_refills_yields_and_expires(tmp_path):
    """Against the recording podman: a matching start is handed a ready warm sandbox and
    the pool refills; a start of another shape misses and takes a warm one's slot (its
    container removed before the new one is created); an expired pool is removed."""
    from imagefarm.runtime.manager import RuntimeManager
    from imagefarm.runtime.node import PinnedHit

    from rtkit import sdk_start_body

    async def go():
        img = f"r.io/p/x@{D}"
        pod = FakePodman()
        pod.stored[img] = ImageInfo("x", (img,), 1)
        cfg = ServeConfig(api_key="k", max_runtimes=3, payloads=(), port_range=(40200, 40299),
                          state_dir=tmp_path / "st")
        m = RuntimeManager(settings(tmp_path), pod, resolver=None, config=cfg)
        m.launcher.http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200)))
        hit = PinnedHit(image=img, base=None, digest=D)

        async def settle():
            for _ in range(100):
                if not m.launcher.tasks and not m.warm.removing:
                    return
                await asyncio.sleep(0.01)

        await m.images.scan()
        assert m.prefetch_pinned(hit, img, 0, None, 2) == (False, 2)
        m.warm.tick()
        await settle()
        warm = m.warm.warm_records()
        assert len(warm) == 2 and {r.pod_status for r in warm} == {"ready"} and m.runtimes() == []
        rec = await m.start(StartRequest(**sdk_start_body(img, "s1")), hit=hit)
        assert rec.runtime_id in {r.runtime_id for r in warm} and rec.pod_status == "ready"
        assert m.records.session("s1") is rec and m.warm.counts.hits == 1
        m.warm.tick()  # refilled: 1 real + 2 warm = the 3 slots
        await settle()
        assert len(m.warm.warm_records()) == 2 and m.used_slots() == 3
        other = await m.start(StartRequest(**sdk_start_body(img, "s2", working_dir="/elsewhere")), hit=hit)
        await settle()
        assert other.extra.get("warm") is None and m.warm.counts.misses == 1 and m.warm.counts.yielded == 1
        assert len(m.warm.warm_records()) == 1 and len(pod.containers) == 3  # never more than the slots
        runs = [c for c in pod.calls if c[0] in ("run", "rm")]
        assert runs[-2][0] == "rm" and runs[-1][0] == "run"  # the warm one went before the new one came
        for t in m.warm.targets.values():
            t.deadline = 0
        m.warm.tick()
        await settle()
        assert m.warm.warm_records() == [] and m.warm.counts.expired == 1 and len(pod.containers) == 2
        m.store.close()
    asyncio.run(go())
