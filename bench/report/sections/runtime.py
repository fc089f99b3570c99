"""Section: The runtime server's ``/start`` to ready against the agent server's own boot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import plots
from ..fmt import TARGET_OVERHEAD_S, mb, ok, sec
from . import Context, Section


def body(rt: dict[str, Any], ctx: Context) -> list[str]:
    """Section 3: runtime start, warm, cold and on demand."""
    L: list[str] = []
    w = L.append
    w(f"The runtime server (`imagefarm runtime serve`, a child process, podman with `runc`, storage private "
      f"to the run) asked `POST /start` for the base `{rt['base'].split('/', 1)[1][:70]}…` (resolved through "
      f"the lookup to its prebuilt image), the client polling `GET /sessions/{{id}}` every 10 ms until "
      f"`pod_status` is `ready` (the server probes `/alive` and `/health`); each runtime stopped before the "
      f"next. Base {mb(rt['base_bytes'])}, payload {mb(rt['payload_bytes'])} compressed.")
    w("")
    w("| start | n | p50 | p95 | min | max |")
    w("|---|---|---|---|---|---|")
    for key, name in (("warm", "runtime `/start` → ready, image on the node (warm)"),
                      ("direct", "the agent server's own boot: `podman run`, same image and limits, polled directly"),
                      ("cold_payload", "runtime, cold payload: base on the node, prebuilt image not (pulls the payload)"),
                      ("cold", "runtime, cold: nothing on the node (pulls base + payload)")):
        s = rt[key]
        if not s.get("n"):
            continue
        w(f"| {name} | {s['n']} | {sec(s['p50'])} | {sec(s['p95'])} | {sec(s['min'])} | {sec(s['max'])} |")
    od = rt["on_demand"]
    w(f"| on demand: `buildah bud` (base + payload) then start | 1 | {sec(od['total_s'])} = build "
      f"{sec(od['build_s'])} + start {sec(od['start_s'])} | | | |")
    w("")
    w(f"Overhead of the runtime server over the agent server's own boot (p50): "
      f"**{rt['overhead_p50_s'] * 1000:+.0f} ms**; `/start` itself answers in {sec(rt['start_answer_s']['p50'])} "
      f"(p50). On demand is {od['total_s'] / rt['warm']['p50']:.0f}× the warm prebuilt start. "
      f"The on-demand build was {od['build']}.")
    bd = rt.get("breakdown") or {}
    rc, rs, dc = (bd.get(k) or {} for k in ("runtime_container_created_s", "runtime_server_ready_s",
                                             "direct_container_created_s"))
    if rc.get("n") and dc.get("n"):
        w("")
        w(f"Where the time goes (p50): the runtime server had the container created (`podman run --detach` "
          f"returned) {sec(rc['p50'])} after `/start` and saw it ready after {sec(rs.get('p50'))} (its own log); "
          f"the direct `podman run --detach` returned after {sec(dc['p50'])}.")
    if rt.get("concurrent"):
        c = rt["concurrent"]
        w("")
        w(f"{c['n']} concurrent `/start`s: all ready after {sec(c['all_ready_s'])}; per runtime p50 "
          f"{sec(c['ready_s']['p50'])}, max {sec(c['ready_s']['max'])} (2 cores shared by {c['n']} booting servers).")
    w("")
    w("![runtime start](bench/runtime.png)")
    w("")
    return L


def targets(ctx: Context) -> list[str]:
    rt = ctx.res.get("runtime")
    if rt:
        return [f"| runtime `/start` → ready, image on the node | agent server's own boot + ≤ 0.1 s | "
                f"p50 {sec(rt['warm']['p50'])} vs own boot p50 {sec(rt['direct']['p50'])}: "
                f"{rt['overhead_p50_s'] * 1000:+.0f} ms | {ok(rt['overhead_p50_s'] <= TARGET_OVERHEAD_S)} |"]
    if "runtime" in ctx.sections:
        return ["| runtime `/start` → ready | agent server's own boot + ≤ 0.1 s | **pending** (see section 3) | – |"]
    return []


def plot(ctx: Context, img: Path) -> None:
    if rt := ctx.res.get("runtime"):
        plots.plot_runtime(rt, img / "runtime.png")


SECTION = Section(
    "runtime",
    3,
    body,
    title="## 3. Runtime start",
    pending=("**Pending.** The runtime section did not produce figures in this run; nothing is substituted "
             "for it.", ""),
    targets=targets,
    target_order=4,
    plot=plot,
)
