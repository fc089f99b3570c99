"""Runtime start: ``POST /start`` to ``pod_status: ready`` on the real runtime server
(``imagefarm runtime serve`` as a child process, podman storage private to this run).

* warm: the prebuilt image is on the node; ``warm_starts`` sequential starts (each
  stopped before the next);
* cold: nothing on the node (``podman rmi --all`` first): the start pulls base + payload;
* cold payload: the base image is on the node, the prebuilt image is not (what a node
  sees after an agent-server version bump): the start pulls the payload layer only;
* the agent server's own boot: ``podman run`` of the same image with the same limits
  (``--cpus 1 --memory 4096m --pids-limit 4096``), polled on ``/alive`` + ``/health``
  directly: the floor the runtime server adds its overhead to;
* on demand: ``buildah bud`` of the same base + payload (the naive image), then its
  start as above; the build time is the one measured in the derive section when it ran
  in this run (its first naive image, built from this base with nothing cached),
  otherwise built here;
* concurrent (full run): ``concurrent_starts`` sessions started at once.
"""

from __future__ import annotations

import json
import re
import secrets
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from imagefarm.derive import Appender

from .context import Bench, free_port
from .derive import CONTAINERFILE
from .machine import loadavg, summary

COMMAND = "/usr/local/bin/openhands-agent-server --port 60000"
LIMITS = ["--cpus", "1", "--memory", "4096m", "--pids-limit", "4096"]


class Server:
    def __init__(self, b: Bench, prefix: str, extra: tuple[str, ...] = ()) -> None:
        self.b = b
        self.key = secrets.token_urlsafe(24)
        url_file = b.work / "runtime.url"
        url_file.unlink(missing_ok=True)
        exe = str(Path(sys.executable).parent / "imagefarm")
        self.proc = b.spawn("runtime", [exe, "runtime", "serve", "--port", "0", "--url-file", str(url_file),
                                        "--to", prefix, "--stop-on-exit", "--idle-timeout", "0",
                                        "--max-runtimes", "32", "--log-level", "info", *extra],
                            env={"IMAGEFARM_RUNTIME_API_KEY": self.key, "IMAGEFARM_STATE_DIR": str(b.state_dir)})
        deadline = time.monotonic() + 90
        while not url_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the runtime server did not start:\n" + b.log_tail("runtime.log"))
            time.sleep(0.1)
        self.url = url_file.read_text().strip()
        self.http = httpx.Client(base_url=self.url, headers={"X-API-Key": self.key}, timeout=60, trust_env=False)

    def close(self) -> None:
        self.http.close()
        self.b.stop_proc(self.proc, timeout=60)

    def start(self, image: str, timeout: float = 600, command: str | list[str] = COMMAND,
              probe: str = "/health", v0: bool = False) -> dict[str, Any]:
        """``/start`` until ``pod_status: ready``; then one GET of ``probe`` on the runtime's URL.
        ``v0``: the body V0's RemoteRuntime sends (no run_as_user, working dir /openhands/code/)."""
        sid = "bench-" + secrets.token_hex(6)
        body = {"image": image, "command": command, "working_dir": "/testbed", "environment": {},
                "session_id": sid, "run_as_user": 10001, "fs_group": 10001,
                "image_pull_policy": "IfNotPresent", "resource_factor": 1}
        if v0:
            body = {k: v for k, v in body.items() if k not in ("run_as_user", "fs_group")}
            body["working_dir"] = "/openhands/code/"
        t0 = time.perf_counter()
        r = self.http.post("/start", json=body)
        answered = time.perf_counter() - t0
        if r.status_code >= 300:
            raise RuntimeError(f"/start answered {r.status_code}: {r.text[:500]}")
        data = r.json()
        rid = data.get("runtime_id") or data.get("id")
        while True:
            s = self.http.get(f"/sessions/{sid}").json()
            if s.get("pod_status") == "ready":
                break
            if s.get("pod_status") in ("failed", "crashloopbackoff") or time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"runtime {rid} did not get ready: {s.get('pod_status')} "
                                   f"{s.get('restart_reasons')} {str(s.get('pod_logs'))[-800:]}")
            time.sleep(0.01)
        ready = time.perf_counter() - t0
        health = httpx.get(data["url"].rstrip("/") + probe, timeout=10, trust_env=False).status_code
        return {"session": sid, "runtime_id": rid, "ready_s": ready, "start_answer_s": answered,
                "health": health, "url": data["url"]}

    def prefetch(self, image: str, *, recipe: str | None = None, warm: int = 0) -> dict[str, Any]:
        r = self.http.post("/prefetch", json={"images": [image], "recipe": recipe, "warm": warm})
        if r.status_code != 200:
            raise RuntimeError(f"/prefetch answered {r.status_code}: {r.text[:500]}")
        return r.json()["images"][0]

    def node(self) -> dict[str, Any]:
        return self.http.get("/nodes").json()[0]

    def wait_node(self, ok, what: str, timeout: float = 900) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not ok(row := self.node()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"runtime server: no {what} within {timeout:g}s: {row}")
            time.sleep(0.1)
        return row

    def timings(self, rid: str) -> dict[str, float]:
        """The server's own log: when the container was created and when it was ready."""
        text = (self.b.work / "runtime.log").read_text(errors="replace")
        out = {}
        for key, pat in (("created_s", rf"runtime {rid}: container created in ([\d.]+)s"),
                         ("server_ready_s", rf"runtime {rid}: ready in ([\d.]+)s after /start")):
            m = re.search(pat, text)
            if m:
                out[key] = float(m.group(1))
        return out

    def stop(self, rt: dict[str, Any]) -> None:
        self.http.post("/stop", json={"runtime_id": rt["runtime_id"]})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = self.http.get(f"/sessions/{rt['session']}")
            if r.status_code == 404 or r.json().get("status") in ("stopped", "error"):
                return
            time.sleep(0.05)


def direct_start(b: Bench, image: str, i: int, timeout: float = 300, command: list[str] | None = None,
                 probes: tuple[str, ...] = ("/alive", "/health")) -> tuple[float, float]:
    """``podman run`` + poll the server ourselves: its own boot, no runtime server.
    ``command`` (default: the agent server's) serves on 60000. Returns (seconds to ready,
    seconds until ``podman run --detach`` returned)."""
    command = command or ["/usr/local/bin/openhands-agent-server", "--port", "60000"]
    name = f"bench-direct-{i}-{secrets.token_hex(3)}"
    port = free_port()
    t0 = time.perf_counter()
    b.containers(["podman", "run", "--detach", "--name", name, "--pull", "never", *LIMITS,
                  "--publish", f"127.0.0.1:{port}:60000", "--env", "SESSION_API_KEY=bench",
                  "--env", "LITELLM_LOCAL_MODEL_COST_MAP=True", "--workdir", "/testbed",
                  "--entrypoint", json.dumps(command[:1]), image, *command[1:]])
    created = time.perf_counter() - t0
    try:
        with httpx.Client(timeout=2, trust_env=False) as c:
            while True:
                try:
                    if all(200 <= c.get(f"http://127.0.0.1:{port}{p}").status_code < 300 for p in probes):
                        return time.perf_counter() - t0, created
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"{image} did not answer /alive within {timeout}s")
                time.sleep(0.02)
    finally:
        b.containers(["podman", "rm", "--force", "--time", "0", name], check=False)


def run_runtime(b: Bench) -> dict[str, Any]:
    plan = b.plan
    reg = b.registry()
    base_img = b.realistic_set()[0]
    base = base_img.ref
    prefix = f"{reg.host}/prebuilt"
    b.check_recipe_stable()
    with Appender(b.settings(to=prefix)) as ap:  # done already if the derive section ran
        derived = ap.derive(base, b.payload, to=prefix)
    prebuilt = derived.ref
    out: dict[str, Any] = {"base": base, "prebuilt": prebuilt, "base_bytes": b.notes.get("real_set", {}).get(
        "image_bytes", [0])[0], "payload_bytes": b.payload.layer.size}
    load0 = loadavg()

    # on demand: build (naive) then start. Reuse the derive section's first naive build.
    naive = b.notes.get("naive_image")
    if naive and naive["base"] == base:
        build_s, tag, how = naive["build_s"], naive["tag"], "measured in the derive section (nothing cached)"
    else:
        b.log("runtime: on-demand build of the base with buildah (nothing cached)")
        b.containers(["podman", "rmi", "--all", "--force"], check=False)
        ctx, _ = b.payload_context()
        cf = b.work / "Containerfile.naive"
        cf.write_text(CONTAINERFILE)
        tag = "localhost/bench-ondemand"
        t0 = time.perf_counter()
        b.containers(["buildah", "bud", "--isolation", "chroot", "--tls-verify=false", "--build-arg",
                      f"BASE={base}", "-f", str(cf), "-t", tag, str(ctx)], timeout=3600)
        build_s, how = time.perf_counter() - t0, "measured here (nothing cached)"
    b.log("runtime: starting the on-demand image")
    od_start, _ = direct_start(b, tag, 0)
    out["on_demand"] = {"build_s": build_s, "start_s": od_start, "total_s": build_s + od_start, "build": how}
    b.containers(["buildah", "rmi", "--force", tag], check=False)
    b.log(f"  on demand: build {build_s:.1f}s + start {od_start:.1f}s")

    srv = Server(b, prefix)
    try:
        # cold: nothing on the node
        cold = []
        for i in range(plan.cold_starts):
            b.containers(["podman", "rmi", "--all", "--force"], check=False)
            b.log(f"runtime: cold start {i + 1}/{plan.cold_starts} (pulls base + payload)")
            rt = srv.start(base)
            cold.append(rt["ready_s"])
            srv.stop(rt)
        # cold payload: the base is on the node, the prebuilt image is not
        cold_payload = []
        for i in range(plan.cold_payload_starts):
            b.containers(["podman", "rmi", "--force", prebuilt], check=False)
            b.containers(["podman", "pull", "--quiet", "--tls-verify=false", base])
            b.log(f"runtime: cold-payload start {i + 1}/{plan.cold_payload_starts} "
                  "(base on the node, pulls the payload)")
            rt = srv.start(base)
            cold_payload.append(rt["ready_s"])
            srv.stop(rt)
        # warm, interleaved with the agent server's own boot (same image and limits, no
        # runtime server) so that both see the same machine load
        warm, answers, direct, direct_created, created, server_ready = [], [], [], [], [], []
        b.log(f"runtime: {plan.warm_starts} warm starts (image on the node), "
              f"{plan.direct_starts} direct podman runs in between")
        for i in range(max(plan.warm_starts, plan.direct_starts)):
            if i < plan.warm_starts:
                rt = srv.start(base)
                warm.append(rt["ready_s"])
                answers.append(rt["start_answer_s"])
                srv.stop(rt)
                tm = srv.timings(rt["runtime_id"])
                if "created_s" in tm:
                    created.append(tm["created_s"])
                if "server_ready_s" in tm:
                    server_ready.append(tm["server_ready_s"])
            if i < plan.direct_starts:
                ready_s, created_s = direct_start(b, prebuilt, i)
                direct.append(ready_s)
                direct_created.append(created_s)
        b.log(f"  warm p50 {summary(warm)['p50']:.2f}s p95 {summary(warm)['p95']:.2f}s; "
              f"own boot p50 {summary(direct)['p50']:.2f}s")
        conc: dict[str, Any] = {}
        if plan.concurrent_starts:
            n = plan.concurrent_starts
            b.log(f"runtime: {n} concurrent starts")
            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                rts = list(pool.map(lambda _: srv.start(base), range(n)))
            wall = time.perf_counter() - t0
            conc = {"n": n, "all_ready_s": wall, "ready_s": summary([r["ready_s"] for r in rts])}
            for rt in rts:
                srv.stop(rt)
    finally:
        srv.close()
    ws, ds = summary(warm), summary(direct)
    out.update({
        "warm": ws, "warm_samples": warm, "start_answer_s": summary(answers),
        "cold": summary(cold), "cold_samples": cold,
        "cold_payload": summary(cold_payload), "cold_payload_samples": cold_payload,
        "direct": ds, "direct_samples": direct,
        "breakdown": {"runtime_container_created_s": summary(created), "runtime_server_ready_s": summary(server_ready),
                      "direct_container_created_s": summary(direct_created)},
        "overhead_p50_s": ws["p50"] - ds["p50"],
        "concurrent": conc,
        "loadavg": [load0, loadavg()],
    })
    return out


def run_starts(b: Bench) -> dict[str, Any]:
    """``/start`` -> ready by what the node already holds, default and V0 side by side in
    one server (which pulled both payloads at start-up, ``--payload``): a warm hit (one
    sandbox prefetched with ``warm: 1``), the image on the node, the base and the payload
    on the node, nothing but the payload on the node. Interleaved per round, so every
    case sees the same load; each runtime stopped before the next."""
    from imagefarm.payload.remote import push
    from imagefarm.registry import RegistryClient

    from .v0 import both_images

    plan = b.plan
    got = both_images(b)
    base, prefix, settings, images = got["base"], got["prefix"], got["settings"], got["images"]
    v0_recipe, v0_built = got["v0_recipe"], got["v0_built"]
    with RegistryClient(settings) as client:  # what `imagefarm payload push` does
        for payload in (b.payload, v0_built):
            push(client, payload, prefix)
    pinned = {k: f"{v.image.rsplit(':', 1)[0]}@{v.digest}" for k, v in images.items()}
    shape = {"default": {}, "v0": {"command": list(v0_recipe.command), "probe": "/alive", "v0": True}}
    b.containers(["podman", "rmi", "--all", "--force"], check=False)
    load0 = loadavg()
    t0 = time.perf_counter()
    srv = Server(b, prefix, ("--payload", "default", "--payload", "v0", "--warm-idle-timeout", "600"))
    cases = ("warm_hit", "image_on_node", "base_and_payload", "payload_only")
    got: dict[str, dict[str, list[float]]] = {r: {c: [] for c in cases} for r in shape}
    try:
        row = srv.wait_node(lambda r: r["ready"], "payloads")
        payload_pull_s = time.perf_counter() - t0
        b.log(f"starts: both payloads on the node in {payload_pull_s:.1f}s: {row['payloads']}")
        for i in range(plan.warm_starts):
            for recipe, kw in shape.items():
                b.log(f"starts: round {i + 1}/{plan.warm_starts}, {recipe}")
                b.containers(["podman", "pull", "--quiet", "--tls-verify=false", pinned[recipe]])
                rt = srv.start(base, **kw)  # also the shape the warm sandbox is booted in
                got[recipe]["image_on_node"].append(rt["ready_s"])
                srv.stop(rt)
                srv.prefetch(base, recipe=recipe, warm=1)
                srv.wait_node(lambda r: r["warm_ready"].get(pinned[recipe]) == 1, "warm sandbox")
                rt = srv.start(base, **kw)
                got[recipe]["warm_hit"].append(rt["ready_s"])
                srv.stop(rt)
                srv.prefetch(base, recipe=recipe, warm=0)  # no refill: the next cases start cold
                srv.wait_node(lambda r: not r["warm"], "warm sandbox gone")
                b.containers(["podman", "rmi", "--force", pinned[recipe]], check=False)
                b.containers(["podman", "pull", "--quiet", "--tls-verify=false", base])
                rt = srv.start(base, **kw)
                got[recipe]["base_and_payload"].append(rt["ready_s"])
                srv.stop(rt)
                b.containers(["podman", "rmi", "--force", pinned[recipe], base], check=False)
                rt = srv.start(base, **kw)
                got[recipe]["payload_only"].append(rt["ready_s"])
                srv.stop(rt)
        row = srv.node()
    finally:
        srv.close()
    out = {"base": base, "images": pinned, "payload_pull_s": payload_pull_s,
           "payload_bytes": {"default": b.payload.layer.size, "v0": v0_built.layer.size},
           "stats": row["stats"], "samples": got,
           "summary": {r: {c: summary(v) for c, v in cases_.items()} for r, cases_ in got.items()},
           "loadavg": [load0, loadavg()]}
    out["warm_over_on_node"] = {r: out["summary"][r]["warm_hit"]["p50"] / out["summary"][r]["image_on_node"]["p50"]
                                for r in shape}
    for r in shape:
        b.log(f"  {r}: warm hit p50 {out['summary'][r]['warm_hit']['p50']:.2f}s, image on node "
              f"{out['summary'][r]['image_on_node']['p50']:.2f}s (ratio {out['warm_over_on_node'][r]:.3f})")
    return out


def render_starts(r: dict[str, Any]) -> list[str]:
    """The section's figures (``bench/report.py`` calls this)."""
    L = [f"One server (`imagefarm runtime serve --payload default --payload v0`), the base "
         f"`{r['base'].split('/', 1)[1][:60]}…`; it pulled both payloads at start-up in "
         f"{r['payload_pull_s']:.1f} s (default {r['payload_bytes']['default'] / 1e6:.1f} MB, V0 "
         f"{r['payload_bytes']['v0'] / 1e6:.1f} MB compressed) and reported ready after. Per round and recipe, "
         "in this order: the image on the node; a warm hit (`POST /prefetch` with `warm: 1`, the start "
         "sent once the sandbox was ready); the base and the payload on the node (`podman rmi` of the "
         "prebuilt image); nothing but the payload (`podman rmi` of the base too). Each runtime stopped "
         "before the next.", "",
         "| recipe | case | n | p50 | p95 | min | max |", "|---|---|---|---|---|---|---|"]
    names = {"warm_hit": "warm hit", "image_on_node": "image on the node",
             "base_and_payload": "base + payload on the node", "payload_only": "nothing but the payload"}
    for recipe, cases in r["summary"].items():
        for case, st in cases.items():
            if st.get("n"):
                L.append(f"| {recipe} | {names[case]} | {st['n']} | {st['p50']:.2f} s | {st['p95']:.2f} s | "
                         f"{st['min']:.2f} s | {st['max']:.2f} s |")
    L += ["", "Warm hit over image on the node (p50, same run; target ≤ 0.2): "
          + ", ".join(f"{k} {v:.3f}" for k, v in r["warm_over_on_node"].items())
          + f". Server counts: {r['stats'].get('warm_hits', 0)} hits, {r['stats'].get('warm_misses', 0)} misses.", ""]
    return L
