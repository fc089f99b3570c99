"""``docs/BENCHMARKS.md`` and the PNG plots, rendered from ``docs/bench/results.json``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from .machine import percentile

TARGET_DERIVE_RATE = 50.0
TARGET_RATIO = 250.0
TARGET_SUBSET_S = 120.0
TARGET_OVERHEAD_S = 0.1
TARGET_LOOKUP_RPS = 5000.0
TARGET_LOOKUP_P99_MS = 5.0


# -- formatting ------------------------------------------------------------------------------
def mb(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    if abs(n) >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if abs(n) >= 1e6:
        return f"{n / 1e6:.1f} MB"
    if abs(n) >= 1e3:
        return f"{n / 1e3:.1f} kB"
    return f"{n:.0f} B"


def sec(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x < 0.001:
        return f"{x * 1e6:.1f} µs"
    if x < 0.01:
        return f"{x * 1000:.2f} ms"
    if x < 1:
        return f"{x * 1000:.0f} ms"
    return f"{x:.2f} s"


def num(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}"


def load(la: Any) -> str:
    """'a → b' of the 1-minute load averages of [start, end] pairs."""
    try:
        if isinstance(la[0], list):
            return f"{la[0][0]:.2f} → {la[1][0]:.2f}"
        return f"{la[0]:.2f}"
    except (TypeError, IndexError, KeyError):
        return "–"


def ok(flag: bool | None) -> str:
    return "–" if flag is None else ("met" if flag else "**not met**")


# -- plots -----------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _label_bars(ax, bars, fmt) -> None:
    for b in bars:
        h = b.get_height()
        ax.annotate(fmt(h), (b.get_x() + b.get_width() / 2, h), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 2), textcoords="offset points")


def plot_derive(r: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fw, fc, nv = r["fast_warm"], r["fast_cold"], r["naive"]
    names = ["fast path,\nwarm", "fast path, cold\n(+ one payload\nupload)", "naive:\nbuildah bud\n+ push"]
    spi = [fw["seconds_per_image"], fc["seconds"] / fc["images"], nv["seconds_per_image"]]
    req = [fw["requests_per_image"], fc["registry_log"]["requests_per_image"], nv["requests_per_image"]]
    moved = [(fw["pushed_bytes"] + fw["pulled_bytes"]) / fw["images"],
             (fc["registry_log"]["pushed_bytes"] + fc["registry_log"]["pulled_bytes"]) / fc["images"],
             (nv["pushed_bytes"] + nv["pulled_bytes"]) / nv["images"]]
    colors = ["#2a9d8f", "#8ab17d", "#e76f51"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, vals, title, fmt in (
            (axes[0], spi, "seconds per image (log)", sec),
            (axes[1], req, "registry requests per image", lambda v: f"{v:.1f}"),
            (axes[2], [max(m, 1) for m in moved], "layer bytes moved per image (log)", mb)):
        bars = ax.bar(names, vals, color=colors)
        _label_bars(ax, bars, fmt)
        ax.set_title(title)
        if "log" in title:
            ax.set_yscale("log")
        ax.margins(y=0.25)
    fig.suptitle(f"derive, same {r['bases']} bases, same registry: fast path {r['ratio']['warm_speedup']:.0f}x "
                 f"faster than naive (warm)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_throughput(scale: dict[str, Any] | None, farm: dict[str, Any] | None, path: Path) -> None:
    plt = _plt()
    names, vals, colors = [], [], []
    if scale:
        for run in scale["runs"]:
            names.append(f"Appender\n{run['threads']} thread{'s' if run['threads'] > 1 else ''}")
            vals.append(run["images_per_s"])
            colors.append("#2a9d8f")
    if farm:
        for run in farm["runs"]:
            if run["executor"] == "celery":
                names.append(f"Celery\n{run['workers']} worker\nproc{'s' if run['workers'] > 1 else ''}")
                colors.append("#264653")
            else:
                names.append(f"run_batch local\n{run['workers']} threads")
                colors.append("#e9c46a")
            vals.append(run["images_per_s"])
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 1), 3.8))
    bars = ax.bar(names, vals, color=colors)
    _label_bars(ax, bars, lambda v: f"{v:.1f}")
    ax.axhline(TARGET_DERIVE_RATE, color="#e76f51", ls="--", lw=1)
    ax.text(len(names) - 0.5, TARGET_DERIVE_RATE, f" target {TARGET_DERIVE_RATE:g}/s", color="#e76f51",
            va="bottom", ha="right", fontsize=8)
    ax.set_ylabel("images per second")
    n = (scale or farm or {}).get("bases", "?")
    ax.set_title(f"fast-path derive throughput, {n} small bases already in the registry")
    ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_copy(r: dict[str, Any], path: Path) -> None:
    plt = _plt()
    names = ["sum of image sizes\n(no dedupe)", "bytes moved\n(imagefarm)", "unique bytes\nof the set"]
    vals = [r["sum_image_bytes"], r["bytes_moved"], r["unique_bytes"]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bars = ax.bar(names, vals, color=["#bbbbbb", "#2a9d8f", "#264653"])
    _label_bars(ax, bars, mb)
    ax.set_ylabel("bytes")
    ax.set_title(f"cold copy of {r['bases']} derived images to an empty registry: "
                 f"efficiency {r['efficiency']:.3f}")
    ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_runtime(r: dict[str, Any], path: Path) -> None:
    plt = _plt()
    groups = [("runtime /start\nwarm", r.get("warm_samples", []), "#2a9d8f"),
              ("agent server's own\nboot (podman run)", r.get("direct_samples", []), "#8ab17d"),
              ("runtime /start\ncold payload", r.get("cold_payload_samples", []), "#e9c46a"),
              ("runtime /start\ncold (pull all)", r.get("cold_samples", []), "#f4a261")]
    od = r.get("on_demand")
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for i, (name, xs, color) in enumerate(groups):
        if xs:
            ax.scatter([i] * len(xs), xs, color=color, alpha=0.7, s=18, zorder=3)
            ax.hlines(percentile(xs, 50), i - 0.3, i + 0.3, color="black", lw=1.5, zorder=4)
    labels = [g[0] for g in groups]
    if od:
        i = len(groups)
        ax.bar([i], [od["build_s"]], color="#e76f51", width=0.6, label="buildah bud")
        ax.bar([i], [od["start_s"]], bottom=[od["build_s"]], color="#8ab17d", width=0.6, label="start")
        labels.append("on demand\n(build, then start)")
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("seconds to ready")
    ax.set_title("start to ready: samples, median bar")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_lookup(r: dict[str, Any], path: Path) -> None:
    plt = _plt()
    rows = [("in process\nwarm", r["in_process"]["warm"]["rps"], r["in_process"]["warm"]["latency_s"]["p99"]),
            ("in process\ncold", r["in_process"]["cold"]["rps"], r["in_process"]["cold"]["latency_s"]["p99"]),
            ("HTTP warm\n(httpx)", r["http"]["warm"]["rps"], r["http"]["warm"]["latency_s"]["p99"]),
            ("HTTP cold\n(httpx)", r["http"]["cold"]["rps"], r["http"]["cold"]["latency_s"]["p99"])]
    ab = r["http"].get("ab")
    if ab and "rps" in ab:
        rows.append(("HTTP warm\n(ab)", ab["rps"], (ab["p99_ms"] or 0) / 1000))
    fl = r.get("floor")
    if fl:
        rows.append(("empty FastAPI\n(httpx)", fl["httpx"]["rps"], fl["httpx"]["latency_s"]["p99"]))
        if fl.get("ab") and "rps" in fl["ab"]:
            rows.append(("empty FastAPI\n(ab)", fl["ab"]["rps"], (fl["ab"]["p99_ms"] or 0) / 1000))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    names = [x[0] for x in rows]
    b1 = axes[0].bar(names, [x[1] for x in rows], color="#2a9d8f")
    _label_bars(axes[0], b1, lambda v: f"{v:,.0f}")
    axes[0].axhline(TARGET_LOOKUP_RPS, color="#e76f51", ls="--", lw=1)
    axes[0].set_yscale("log")
    axes[0].set_title("lookups per second (log); target 5,000 warm")
    b2 = axes[1].bar(names, [max(x[2] * 1000, 1e-3) for x in rows], color="#264653")
    _label_bars(axes[1], b2, lambda v: f"{v:.2f} ms")
    axes[1].axhline(TARGET_LOOKUP_P99_MS, color="#e76f51", ls="--", lw=1)
    axes[1].set_yscale("log")
    axes[1].set_title("p99 latency, ms (log); target 5 ms")
    for ax in axes:
        ax.margins(y=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- markdown -------------------------------------------------------------------------------------
def _section_head(entry: dict[str, Any], run_when: str) -> list[str]:
    head = (f"Reproduce: `{entry['command']}` · measured {entry.get('when', '?')}"
            f"{' (in the earlier run started ' + str(entry.get('run')) + ')' if (entry.get('run') or run_when) != run_when else ''}"
            f" · load average (1 min) {entry['loadavg_start'][0]:.2f} at start, {entry['loadavg_end'][0]:.2f} at end"
            f" · section took {entry['seconds']:.0f} s{' · **--quick sizes**' if entry.get('quick') else ''}")
    return [head, ""]


def _error(entry: dict[str, Any], what: str) -> list[str]:
    return [f"**Not measured: the {what} section failed in this run** — `{entry['error']}`.",
            "", "<details><summary>traceback</summary>", "", "```", entry.get("traceback", "").strip(), "```",
            "", "</details>", ""]


def _intro(results: dict[str, Any], m: dict[str, Any], S: dict[str, Any]) -> list[str]:
    """The title, where the figures come from, and warnings about the run."""
    L: list[str] = []
    w = L.append
    w("# Benchmarks")
    w("")
    w(f"Generated by `{'make bench' if results.get('make') else results['command']}` "
      f"(`bench/`, see [bench/README.md](../bench/README.md)) on {m['when']}, in "
      f"{results['seconds'] / 60:.1f} min. Do not edit by hand: re-run the command, or "
      f"`.venv/bin/python -m bench --report-only` to re-render from `docs/bench/results.json`. "
      f"No test asserts any of these numbers.")
    w("")
    whens = sorted({v.get("run") or v.get("when", "") for v in S.values()})
    if len(whens) > 1:
        w(f"> The sections below come from {len(whens)} runs (the later ones with `--only`): each says its own "
          "command, time and load average.")
        w("")
    if any(v.get("quick") for v in S.values()):
        w("> **Some sections below come from a `--quick` run** (small sizes, for developing the harness): "
          "they show the shape, not the reference figures. `make bench` gives the full run.")
        w("")
    peak = max([m["loadavg_start"][0]] + [x for v in S.values()
                                           for x in (v.get("loadavg_start", [0])[0], v.get("loadavg_end", [0])[0])])
    if peak > (m["cores"] or 1) * 0.75:
        w(f"> **The machine was busy when this ran** (1-minute load average up to {peak:.2f} on {m['cores']} "
          "cores: other work shared it). Every figure carries its own load average; on a quiet machine the "
          "timings will be better.")
        w("")
    return L


def _machine(m: dict[str, Any], pl: dict[str, Any] | None) -> list[str]:
    """The machine table (and the payload measured)."""
    L: list[str] = []
    w = L.append
    w("## Machine")
    w("")
    w("| | |")
    w("|---|---|")
    w(f"| cores | {m['cores']} × {m['cpu_model']} |")
    w(f"| memory | {m['memory_total_gb']} GB total, {m['memory_available_gb']} GB available at start |")
    w(f"| disk | {m['disk_free_gb']} GB free of {m['disk_total_gb']} GB ({m['disk_path'].rsplit('/', 1)[0]}) |")
    w(f"| kernel / OS | {m['kernel']} / {m['os']} |")
    w(f"| load average at start | {' / '.join(f'{x:.2f}' for x in m['loadavg_start'])} (1 / 5 / 15 min) |")
    w(f"| python | {m['python']} |")
    w(f"| tools | {'; '.join(f'{v}' for v in m['tools'].values())} |")
    w(f"| imagefarm | git {m['git']} |")
    if pl:
        w(f"| payload | recipe `{pl['recipe']}`, openhands-agent-server {pl['agent_server_version']}: "
          f"{mb(pl['size'])} gzip, {mb(pl['uncompressed'])} unpacked, `{pl['digest'][:19]}` |")
    w("")
    return L


def _targets(S: dict[str, Any], res: dict[str, Any]) -> list[str]:
    """Each figure against its target in ARCHITECTURE.md."""
    L: list[str] = []
    w = L.append
    w("## Against the targets (ARCHITECTURE.md)")
    w("")
    w("| figure | target | measured | |")
    w("|---|---|---|---|")
    d, sc, fa, cp, rt, lk = (res.get(k) for k in ("derive", "scale", "farm", "copy", "runtime", "lookup"))
    if sc:
        w(f"| derive, base in the target registry | ≥ {TARGET_DERIVE_RATE:g} images/s | "
          f"{sc['best_images_per_s']:.1f} images/s ({sc['best_threads']} threads, {sc['bases']} bases) | "
          f"{ok(sc['best_images_per_s'] >= TARGET_DERIVE_RATE)} |")
    if d:
        w(f"| fast path vs naive, same run | ≥ {TARGET_RATIO:g}× | {d['ratio']['warm_speedup']:.0f}× "
          f"(1 thread each; {d['ratio']['cold_speedup']:.0f}× counting the one-time payload upload) | "
          f"{ok(d['ratio']['warm_speedup'] >= TARGET_RATIO)} |")
    full = (fa or {}).get("full")
    if full:
        by = {r["executor"]: r for r in full["runs"]}
        cel, loc = by.get("celery"), by.get("local")
        w(f"| all {full['bases']:,} R2E-Gym-Subset bases (payload seeded in the prefix) | < 2 min through Celery as "
          f"through the local pool | Celery {sec(cel['seconds'])} ({cel['images_per_s']:.0f}/s, {cel['workers']} "
          f"worker processes); local pool {sec(loc['seconds'])} ({loc['images_per_s']:.0f}/s), same run | "
          f"{ok(cel['seconds'] < TARGET_SUBSET_S and loc['seconds'] < TARGET_SUBSET_S and not cel['failed'])} |")
    elif sc:
        w(f"| all 4,578 R2E-Gym-Subset bases | < 2 min | {sc['r2e_subset_extrapolated_s']:.0f} s "
          f"(extrapolated from {sc['bases']} bases at the best rate) | "
          f"{ok(sc['r2e_subset_extrapolated_s'] < TARGET_SUBSET_S)} |")
    if cp:
        w(f"| agent-server version bump | 0 base bytes moved | {mb(cp['bump']['base_bytes_moved'])} of base "
          f"layers moved re-deriving {cp['bump']['images']} images | {ok(cp['bump']['base_bytes_moved'] == 0)} |")
        w(f"| cross-registry copy | bytes moved = unique bytes | efficiency {cp['efficiency']:.3f} "
          f"({mb(cp['bytes_moved'])} moved, {mb(cp['unique_bytes'])} unique) | "
          f"{ok(abs(cp['efficiency'] - 1) < 0.01)} |")
    if rt:
        w(f"| runtime `/start` → ready, image on the node | agent server's own boot + ≤ 0.1 s | "
          f"p50 {sec(rt['warm']['p50'])} vs own boot p50 {sec(rt['direct']['p50'])}: "
          f"{rt['overhead_p50_s'] * 1000:+.0f} ms | {ok(rt['overhead_p50_s'] <= TARGET_OVERHEAD_S)} |")
    elif "runtime" in S:
        w("| runtime `/start` → ready | agent server's own boot + ≤ 0.1 s | **pending** (see section 3) | – |")
    if lk:
        hw = lk["http"]["warm"]
        w(f"| lookup, warm | ≥ 5,000/s, p99 ≤ 5 ms | HTTP {hw['rps']:,.0f}/s, p99 {hw['latency_s']['p99'] * 1000:.1f} ms "
          f"({hw['concurrency']} httpx clients); in process {lk['in_process']['warm']['rps']:,.0f}/s, "
          f"p99 {lk['in_process']['warm']['latency_s']['p99'] * 1000:.3f} ms | "
          f"HTTP {ok(hw['rps'] >= TARGET_LOOKUP_RPS and hw['latency_s']['p99'] * 1000 <= TARGET_LOOKUP_P99_MS)} |")
    if flt := res.get("fleet"):
        img_, rnd = flt["results"]
        ratio = img_["bytes_pulled"] / rnd["bytes_pulled"]
        w(f"| fleet placement, 512 sandboxes (model) | image-aware pulls ≤ 1/4 of random's bytes | "
          f"{ratio:.2f} ({mb(img_['bytes_pulled'])} vs {mb(rnd['bytes_pulled'])}) | {ok(ratio <= 0.25)} |")
    w("")
    return L


def _derive(d: dict[str, Any]) -> list[str]:
    """Section 1: the fast path against the naive build."""
    L: list[str] = []
    w = L.append
    st = d.get("set") or {}
    fw, fc, nv = d["fast_warm"], d["fast_cold"], d["naive"]
    w(f"**Bases:** {d['bases']} r2e-shaped fixture images in one registry (docker-registry on loopback): a shared "
      f"Debian OS layer and venv layer plus a unique `/testbed` layer each ({st.get('unique_mib', '?')} MiB of "
      f"random bytes, which the git checkout holds twice): {mb(min(st.get('image_bytes', [0])))}–"
      f"{mb(max(st.get('image_bytes', [0])))} per image compressed, {mb(st.get('unique_bytes'))} unique in "
      f"the set. **Payload:** the real agent-server layer ({mb(d['payload']['size'])} gzip).")
    w("")
    w("- **fast path**: `Appender.derive` (manifest surgery: mount base blobs, append the payload layer, "
      "new config and manifest). *Cold* = a fresh `Appender` and prefix, so the first derive uploads the "
      "payload blob (once per registry). *Warm* = the steady state: "
      f"{fw['rounds']} rounds over the same bases into fresh prefixes with one `Appender` (one farm process), "
      "payload already in the registry, 1 thread.")
    w("- **naive**: `buildah bud --isolation chroot` of `FROM <base>` + `COPY . /` of the payload tree "
      f"(the layer unpacked once into a build context, {sec(nv['unpack_context_s'])}, not counted), then "
      "`buildah push` to the same registry; container storage private to the run and empty at the start, "
      "so the first build pulls the whole base and later ones pull only their unique layer.")
    w("- **requests and bytes** for both paths are read from the registry's access log (one line per "
      "request; bytes pulled = response sizes of blob GETs, bytes pushed = sizes of the blobs whose "
      "upload completed). The fast path's own client counters agree: "
      f"{fw['client_requests_per_image']:.1f} requests/image counted client-side.")
    w("")
    w("| path | images | seconds/image | images/s | requests/image | pulled/image | pushed/image | load avg |")
    w("|---|---|---|---|---|---|---|---|")
    w(f"| fast path, warm | {fw['images']} | {sec(fw['seconds_per_image'])} | {fw['images_per_s']:.1f} | "
      f"{fw['requests_per_image']:.1f} | {mb(fw['pulled_bytes'] / fw['images'])} | "
      f"{mb(fw['pushed_bytes'] / fw['images'])} | {load(fw['loadavg'])} |")
    fl = fc["registry_log"]
    w(f"| fast path, cold (incl. one payload upload) | {fc['images']} | {sec(fc['seconds'] / fc['images'])} | "
      f"{fc['images_per_s']:.1f} | {fl['requests_per_image']:.1f} | {mb(fl['pulled_bytes'] / fc['images'])} | "
      f"{mb(fl['pushed_bytes'] / fc['images'])} | {load(fc['loadavg'])} |")
    w(f"| naive `buildah bud` + push | {nv['images']} | {sec(nv['seconds_per_image'])} | "
      f"{nv['images_per_s']:.3f} | {nv['requests_per_image']:.1f} | {mb(nv['pulled_bytes'] / nv['images'])} | "
      f"{mb(nv['pushed_bytes'] / nv['images'])} | {load(nv['loadavg'])} |")
    w("")
    w(f"**Ratio (naive seconds per image ÷ fast path seconds per image): {d['ratio']['warm_speedup']:.0f}× warm, "
      f"{d['ratio']['cold_speedup']:.0f}× cold.** Naive build {sec(sum(nv['build_s']) / nv['images'])} + push "
      f"{sec(sum(nv['push_s']) / nv['images'])} per image on average (per image: "
      + ", ".join(f"{a:.0f}+{b:.0f} s" for a, b in zip(nv["build_s"], nv["push_s"])) + "). "
      f"Bytes over the wire per image: naive {mb(d['ratio']['bytes_per_image_naive'])} (layers), fast path "
      f"{mb(d['ratio']['bytes_per_image_fast'])} of layers and {mb(d['ratio']['wire_bytes_per_image_fast'])} "
      "in all (manifests, configs).")
    if nv["images"] > 1 and min(nv["push_s"][1:]) < 1.0:
        w("")
        w("After the first image the naive pushes take well under a second: the `COPY` layer is byte-identical "
          "from build to build, buildah's blob-info cache knows its compressed digest, and the push skips it "
          "(HEAD says the registry has it). The naive figures include that help; the builds "
          "(pull of the unique base layer, copy of the payload tree, commit) remain.")
    if nv.get("budget_hit"):
        w("")
        w(f"The naive loop stopped after {nv['images']} of {nv['planned']} images: its time budget "
          f"({nv['budget_s']:.0f} s) was spent; the per-image figures are over the images built.")
    w("")
    w("![derive: fast path vs naive](bench/derive.png)")
    w("")
    return L


def _scale(sc: dict[str, Any]) -> list[str]:
    """Threads: the same derive at 1..N threads."""
    L: list[str] = []
    w = L.append
    w(f"{sc['bases']} small r2e-shaped bases (shared OS + venv layers, a small unique checkout) already in "
      "the registry, payload already there; each run is a fresh `Appender` (a new process's state) deriving "
      "every base into a fresh prefix.")
    w("")
    w("| run | images | wall | images/s | latency p50 / p95 | requests/image | layer bytes moved | load avg |")
    w("|---|---|---|---|---|---|---|---|")
    for r in sc["runs"]:
        w(f"| `Appender`, {r['threads']} thread(s) | {r['images']} | {sec(r['seconds'])} | {r['images_per_s']:.1f} | "
          f"{sec(r['latency_s']['p50'])} / {sec(r['latency_s']['p95'])} | "
          f"{r['registry_log']['requests_per_image']:.1f} | {mb(r['client']['bytes_moved'])} | {load(r['loadavg'])} |")
    w("")
    w(f"At the best rate ({sc['best_images_per_s']:.1f} images/s) the 4,578 R2E-Gym-Subset bases would take "
      f"{sc['r2e_subset_extrapolated_s']:.0f} s (extrapolated, one 2-core node, registry on the same node).")
    w("")
    return L


def _farm(fa: dict[str, Any]) -> list[str]:
    """The farm: run_batch with the local pool and with Celery."""
    L: list[str] = []
    w = L.append
    w(f"`imagefarm.farm.prebuild.run_batch` over the same {fa['bases']} bases (`verify=\"none\"`), timed from the "
      "call to its return (driver, task submission, result polling included), each run into a fresh prefix. "
      "Celery: real `redis-server`, real worker processes (`celery -A imagefarm.worker.app worker -Q derive "
      "--concurrency N`, prefork); worker start-up not included.")
    w("")
    w("| executor | images | derived / failed | wall | images/s | worker ready in | load avg |")
    w("|---|---|---|---|---|---|---|")
    for r in fa["runs"]:
        name = (f"Celery, {r['workers']} worker process(es)" if r["executor"] == "celery"
                else f"local pool, {r['workers']} threads")
        w(f"| {name} | {r['images']} | {r['derived']} / {r['failed']} | {sec(r['seconds'])} | "
          f"{r['images_per_s']:.1f} | {sec(r.get('worker_ready_s'))} | {load(r['loadavg'])} |")
    w("")
    if fa.get("full"):
        full = fa["full"]
        w(f"**At full size**, the same run: all {full['bases']:,} bases (R2E-Gym-Subset's size; the first "
          f"{fa['bases']} are the set above), each executor into a fresh prefix. The driver reads Celery results "
          "in sweeps (one `MGET` of every pending result key per 0.1 s), not one request per task.")
        w("")
        w("| executor | images | derived / failed | wall | images/s | load avg |")
        w("|---|---|---|---|---|---|")
        for r in full["runs"]:
            name = (f"Celery, {r['workers']} worker process(es)" if r["executor"] == "celery"
                    else f"local pool, {r['workers']} threads")
            w(f"| {name} | {r['images']:,} | {r['derived']:,} / {r['failed']} | {sec(r['seconds'])} | "
              f"{r['images_per_s']:.1f} | {load(r['loadavg'])} |")
        w("")
    fails = [f for r in fa["runs"] + (fa.get("full") or {}).get("runs", []) for f in r.get("failures", [])]
    if fails:
        w(f"First failures: {'; '.join(f['base'] + ': ' + f['reason'][:200] for f in fails[:3])}")
        w("")
    return L


def _copy(cp: dict[str, Any]) -> list[str]:
    """Section 2: cold copy across registries, and a payload bump."""
    L: list[str] = []
    w = L.append
    w(f"The {cp['bases']} realistic bases in registry A derived into an empty registry B ({cp['threads']} "
      "threads, one `Appender`): base layers are copied A → B once (two derives sharing a layer copy it "
      "once), the payload is uploaded once and mounted afterwards. *Unique bytes* = the distinct blobs "
      "the derived manifests in B reference (layers and configs, the payload once). *Efficiency* = unique ÷ moved.")
    w("")
    w("| images | wall | bytes moved | unique bytes | efficiency | sum of image sizes | requests/image | load avg |")
    w("|---|---|---|---|---|---|---|---|")
    w(f"| {cp['bases']} | {sec(cp['seconds'])} | {mb(cp['bytes_moved'])} | {mb(cp['unique_bytes'])} | "
      f"**{cp['efficiency']:.3f}** | {mb(cp['sum_image_bytes'])} | {cp['requests_per_image']:.1f} | "
      f"{load(cp['loadavg'])} |")
    w("")
    bp = cp["bump"]
    w(f"Payload change (a new {mb(bp['layer_bytes'])} layer and recipe digest standing in for an agent-server "
      f"version bump) over the same {bp['images']} images in B: {sec(bp['seconds'])}, "
      f"{mb(bp['bytes_moved'])} moved in all, **{mb(bp['base_bytes_moved'])} of base layers**, "
      f"{bp['requests_per_image']:.1f} requests/image.")
    w("")
    w("![copy](bench/copy.png)")
    w("")
    return L


def _runtime(rt: dict[str, Any]) -> list[str]:
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


def _v0(r: dict[str, Any]) -> list[str]:
    """Section 7: the V0 action execution server's image beside the agent server's."""
    L: list[str] = []
    w = L.append
    w(f"Both images of the base `{r['base'].split('/', 1)[1][:70]}…`, on the node (warm): the runtime server "
      "asked with each client's own command (the agent server's; V0's `micromamba run -n openhands python -u -m "
      "openhands.runtime.action_execution_server 60000 ...`, which selects the `v0` image), interleaved, each "
      "runtime stopped before the next; ready = every path of the recipe's `ready` answers (agent server "
      "`/alive` + `/health`; V0 `/alive`, served once its tmux bash session is up). Own boot: `podman run` "
      f"with the same limits, polled directly. Payloads: agent server {mb(r['payload_bytes']['default'])}, "
      f"V0 {mb(r['payload_bytes']['v0'])} compressed ({mb(r['payload_unpacked_bytes']['v0'])} unpacked).")
    w("")
    w("| start | n | p50 | p95 | min | max |")
    w("|---|---|---|---|---|---|")
    for key, name in (("ready", "runtime `/start` → ready"), ("own_boot", "own boot (`podman run`, polled directly)")):
        for recipe, label in (("default", "agent server (default)"), ("v0", "V0 action execution server (v0)")):
            st = r[key][recipe]
            if st.get("n"):
                w(f"| {label}: {name} | {st['n']} | {sec(st['p50'])} | {sec(st['p95'])} | {sec(st['min'])} | "
                  f"{sec(st['max'])} |")
    w("")
    return L


def _lookup(lk: dict[str, Any], results: dict[str, Any], m: dict[str, Any]) -> list[str]:
    """Section 4: lookups in process and over HTTP."""
    L: list[str] = []
    w = L.append
    ip, hc, hw, ab = lk["in_process"], lk["http"]["cold"], lk["http"]["warm"], lk["http"].get("ab")
    w(f"{lk['bases']} bases with prebuilt images under `{lk['prefix'].split('/', 1)[1]}`. *In process*: "
      "`Lookup.resolve` in a loop, one thread. *HTTP*: the real service (`imagefarm serve-lookup`: FastAPI, "
      "uvicorn, one process, API key on) loaded by `bench.loadgen` in its own process (asyncio httpx clients, "
      "keep-alive). *Cold* = each base asked once of a fresh `Lookup` / freshly started service (tag list, "
      "manifest and verification-record reads against the registry); *warm* = the same bases asked again "
      f"for {results['plan']['lookup_seconds']:g} s. Client and server share the {m['cores']} cores.")
    w("")
    w("| lookup | requests | per second | p50 | p99 | max | errors / non-200 |")
    w("|---|---|---|---|---|---|---|")
    w(f"| in process, warm | {ip['warm']['requests']:,} | {ip['warm']['rps']:,.0f} | "
      f"{sec(ip['warm']['latency_s']['p50'])} | {sec(ip['warm']['latency_s']['p99'])} | "
      f"{sec(ip['warm']['latency_s']['max'])} | 0 |")
    w(f"| in process, cold | {ip['cold']['requests']:,} | {ip['cold']['rps']:,.0f} | "
      f"{sec(ip['cold']['latency_s']['p50'])} | {sec(ip['cold']['latency_s']['p99'])} | "
      f"{sec(ip['cold']['latency_s']['max'])} | 0 |")
    for name, h in (("HTTP, warm", hw), ("HTTP, cold", hc)):
        bad = h["errors"] + sum(v for k, v in h["status"].items() if str(k) != "200")
        w(f"| {name}, {h['concurrency']} httpx clients | {h['requests']:,} | {h['rps']:,.0f} | "
          f"{sec(h['latency_s']['p50'])} | {sec(h['latency_s']['p99'])} | {sec(h['latency_s']['max'])} | {bad} |")
    if ab and "rps" in ab:
        w(f"| HTTP, warm, `ab -k -c {ab['concurrency']}` (one URL) | {ab['requests']:,} | {ab['rps']:,.0f} | "
          f"{ab['p50_ms']} ms | {ab['p99_ms']} ms | | {ab['failed'] + ab['non_2xx']} |")
    fl = lk.get("floor")
    if fl:
        fh, fa_ = fl["httpx"], fl.get("ab")
        w(f"| *calibration:* an almost empty FastAPI endpoint (`bench/floor.py`), same serving, "
          f"{fh['concurrency']} httpx clients | {fh['requests']:,} | {fh['rps']:,.0f} | "
          f"{sec(fh['latency_s']['p50'])} | {sec(fh['latency_s']['p99'])} | {sec(fh['latency_s']['max'])} | "
          f"{fh['errors']} |")
        if fa_ and "rps" in fa_:
            w(f"| *calibration:* the same, `ab -k -c {fa_['concurrency']}` | {fa_['requests']:,} | "
              f"{fa_['rps']:,.0f} | {fa_['p50_ms']} ms | {fa_['p99_ms']} ms | | {fa_['failed'] + fa_['non_2xx']} |")
    w("")
    w(f"Load average {load(lk['loadavg'])}.")
    w("")
    w("![lookup](bench/lookup.png)")
    w("")
    return L


def _ratelimit(rl: dict[str, Any]) -> list[str]:
    """Section 5: a batch from a rate-limited registry, planned vs moved."""
    L: list[str] = []
    w = L.append
    pl, rn, np_ = rl["plan"], rl["run"], rl["run_without_plan"]
    w(f"{rl['bases']} bases ({rl['realistic']} realistic, {rl['small']} small) in registry A behind the "
      f"Docker-Hub-like stand-in (`imagefarm.testing.ratelimited`: {rl['limit']} manifest GETs per "
      f"{rl['window']:g} s window, sliding, 429 past it; HEAD and blobs not counted). *Planned*: "
      "`make_plan` (what `imagefarm prebuild --plan` prints); *moved*: the stand-in's own log during the "
      "run that followed (layer blobs served, counted requests), and registry B's access log (blob bytes "
      "that landed). The plan reads each manifest once (HEAD first, GET only for bases not done) and "
      "keeps it by digest, so the run reads tags with HEAD and spends no pull.")
    w("")
    w("| | layer blobs | layer bytes | counted requests (pulls) | 429 answers | time |")
    w("|---|---|---|---|---|---|")
    w(f"| planned (`--plan`) | {pl['layers']} | {mb(pl['layer_bytes'])} | {pl['pulls']} spent by the plan "
      f"(stand-in log: {pl['pulls_in_log']}), 0 more for the run | – | plan took {sec(pl['seconds'])}; "
      f"estimate {sec(pl['estimate_s'])} at {mb(pl['bandwidth'])}/s |")
    w(f"| moved by the run | {rn['layers']} | {mb(rn['layer_bytes'])} (B received {mb(rn['pushed_bytes'])} "
      f"incl. payload and configs) | {rn['pulls']} | {rn['refused_429']} | {sec(rn['seconds'])}, derived "
      f"{rn['derived']}, failed {rn['failed']} |")
    w(f"| run with no plan first (empty registry C) | {np_['layers']} | {mb(np_['layer_bytes'])} | "
      f"{np_['pulls']} | {np_['refused_429']} | {sec(np_['seconds'])} (the budget alone needs ≥ "
      f"{sec(np_['min_seconds_by_budget'])}), {np_['pauses']} pauses, derived {np_['derived']}, failed "
      f"{np_['failed']} |")
    w("")
    w("Before this change (issue #17, measured by the issue's author against a stand-in allowing 10 "
      "manifest GETs per 60 s): 40 bases gave 24 derived and 16 failed after 125 s, with more than 700 "
      f"429 answers. Load average {load(rl['loadavg'])}.")
    w("")
    return L


def _fleet(flt: dict[str, Any]) -> list[str]:
    """Section 6: image-aware against random placement, in a model fed with measured costs."""
    L: list[str] = []
    w = L.append
    a, c = flt["args"], flt["costs"]
    w(f"A model (`bench/fleet.py`) driven by the front's own placement function "
      f"(`imagefarm.runtime.placement.place`, one decision per `/start`, each seeing what the previous took): "
      f"{a['nodes']} nodes × {a['slots']} slots, {a['steps']} RL steps of {a['instances']} instances × "
      f"{a['samples']} samples = {a['instances'] * a['samples']} sandboxes started at once in a shuffled "
      f"order, instances drawn from {a['dataset']:,} distinct images (bases 300 MB–1.4 GB compressed, "
      f"uniform) that share the payload layer. Costs measured here (section 3): the payload layer "
      f"{mb(c['payload_bytes'])} pulls and unpacks in {c['payload_seconds']:.1f} s, bases at "
      f"{mb(c['base_bytes_per_s'])}/s, then the agent server boots in {c['boot_seconds']:.2f} s; a node "
      f"pulls a layer once, one pull at a time. Disk = compressed bytes of the layers a node holds "
      f"(no cache budget: after the last step).")
    w("")
    w("| placement | sandboxes | bytes pulled | start → ready p50 | p99 | largest node disk | mean node disk |")
    w("|---|---|---|---|---|---|---|")
    for r in flt["results"]:
        w(f"| {r['policy']} | {r['sandboxes']:,} | {mb(r['bytes_pulled'])} | {sec(r['p50_s'])} | "
          f"{sec(r['p99_s'])} | {mb(r['peak_node_disk_bytes'])} | {mb(r['mean_node_disk_bytes'])} |")
    img_, rnd = flt["results"]
    w("")
    w(f"Image-aware placement pulls **{img_['bytes_pulled'] / rnd['bytes_pulled']:.2f}×** random's bytes "
      f"(the samples of an instance share a node, so an image is pulled about once instead of on ~"
      f"{a['samples']} nodes), starts p50 {rnd['p50_s'] / img_['p50_s']:.1f}× sooner, and needs "
      f"{rnd['peak_node_disk_bytes'] / img_['peak_node_disk_bytes']:.1f}× less disk on the fullest node. "
      "A model, not a cluster run: the registry's egress and the nodes' CPUs during boot are not modelled. "
      "The real fleet on a two-node SLURM cluster is tested in `tests/runtime/test_fleet_slurm.py`.")
    w("")
    from .fleet import render_foresight
    return L + render_foresight(flt)


def _relayer(r: dict[str, Any]) -> list[str]:
    """Section 7: what a node pulls and the registry stores for one repository's group."""
    L: list[str] = []
    w = L.append
    p, q = r["plain"], r["relayered"]
    w(f"{r['bases']} commits of one git repository ({r['files']} source files, a few changed per commit, "
      "some deleted), each base R2E-shaped: the shared Debian layer, the checkout (`/testbed` with `.git`) "
      "and the venv installed for it as separate layers; derived with the real payload both ways into one "
      "registry. *Node pull* = the distinct blobs of the group's images (what a node starting all of them "
      "fetches); *stored* = the same set kept by the registry; *unique per image* = bytes of blobs no other "
      "image of the group references (what one more image costs a node holding a sibling).")
    w("")
    w("| | node pull for the group | stored in the registry | unique per image (mean / max) | "
      "image size (mean) | time |")
    w("|---|---|---|---|---|---|")
    for name, x in (("plain derive (default)", p), ("re-layered (`--relayer`)", q)):
        w(f"| {name} | {mb(x['node_pull_bytes'])} | {mb(x['stored_bytes'])} | {mb(x['unique_mean_bytes'])} / "
          f"{mb(x['unique_max_bytes'])} | {mb(x['image_bytes_mean'])} | {sec(x['seconds'])} |")
    bs = r["base"]
    w(f"| the bases as they are (no payload) | {mb(bs['node_pull_bytes'])} | {mb(bs['stored_bytes'])} | "
      f"{mb(bs['unique_mean_bytes'])} / {mb(bs['unique_max_bytes'])} | {mb(bs['image_bytes_mean'])} | – |")
    w("")
    extra = p["node_pull_bytes"] - bs["node_pull_bytes"]  # the payload and the configs, the same both ways
    w(f"Leaving out what both ways add alike (payload and configs, {mb(extra)}), the group's own bytes a node "
      f"pulls go from {mb(bs['node_pull_bytes'])} to {mb(q['node_pull_bytes'] - extra)}.")
    w("")
    w(f"Re-layering the group took **{sec(q['seconds'])}** on {r['cores']} cores (load {load(r['loadavg'][0])} "
      f"→ {load(r['loadavg'][1])}): {mb(q['bytes_read'])} of layers read from the registry (each blob once, "
      f"streamed), a common layer of {mb(q['common_bytes'])}, own layers of {mb(q['own_mean_bytes'])} on "
      f"average, and {q['proved_paths']:,} paths proven equal to base + payload before any tag was put. "
      f"Node pull {p['node_pull_bytes'] / q['node_pull_bytes']:.1f}× smaller, one more image "
      f"{p['unique_mean_bytes'] / max(q['unique_mean_bytes'], 1):.0f}× cheaper. The plain time is the fast "
      "path's manifest surgery (no layer read), given for scale, not as a rival.")
    w("")
    return L


def _notes() -> list[str]:
    """How everything was measured."""
    L: list[str] = []
    w = L.append
    w("## Notes on method")
    w("")
    w("- Every service is real and private to the run: docker-registry (CNCF distribution) with its access "
      "log on, redis-server, Celery worker processes, the runtime server, the lookup API; podman/buildah "
      "storage lives in the run's temporary state directory. All of it is stopped and removed at the end "
      "(also on Ctrl-C).")
    w("- Fixture layers (the Debian rootfs, the random `/testbed` layers) are cached under "
      "`~/.cache/imagefarm/fixtures`, the payload under `~/.cache/imagefarm/payload`; building them is not "
      "timed.")
    w("- The registry, the clients and the builds share one machine: registry CPU is part of every figure.")
    w("- Load average is the 1-minute figure from `/proc/loadavg`, at the start and end of each measurement.")
    w("")
    return L


def _section(S: dict[str, Any], name: str, when: str, result: dict[str, Any] | None,
             body: Callable[[dict[str, Any]], list[str]], *, title: str | None = None,
             pending: list[str] = ()) -> list[str]:
    """One section: its title, how to reproduce it, then its figures, or why there are none."""
    L = [title, ""] if title else []
    if name in S:
        L += _section_head(S[name], when)
    if result:
        L += body(result)
    elif name in S:
        L += [*pending, *_error(S[name], name)]
    return L


def render(results: dict[str, Any], out: Path) -> None:
    out = Path(out)
    img = out / "bench"
    img.mkdir(parents=True, exist_ok=True)
    m = results["machine"]
    S = results["sections"]
    res = {k: v.get("result") for k, v in S.items() if v.get("result")}
    d, sc, fa, cp, rt, lk = (res.get(k) for k in ("derive", "scale", "farm", "copy", "runtime", "lookup"))
    when = m["when"]
    L = _intro(results, m, S)
    L += _machine(m, results.get("notes", {}).get("payload") or (d or {}).get("payload"))
    L += _targets(S, res)
    L += _section(S, "derive", when, d, _derive, title="## 1. Derive: fast path vs the naive way, same bases, same registry")
    L += _section(S, "scale", when, sc, _scale, title="### At scale: threads, and the farm")
    L += _section(S, "farm", when, fa, _farm)
    if sc or fa:
        L += ["![throughput](bench/throughput.png)", ""]
    L += _section(S, "copy", when, cp, _copy, title="## 2. Cold copy across registries")
    L += _section(S, "runtime", when, rt, _runtime, title="## 3. Runtime start", pending=[
        "**Pending.** The runtime section did not produce figures in this run; nothing is substituted for it.", ""])
    L += _section(S, "lookup", when, lk, lambda r: _lookup(r, results, m), title="## 4. Lookup")
    L += _section(S, "ratelimit", when, res.get("ratelimit"), _ratelimit,
                  title="## 5. A batch from a rate-limited registry: `--plan` vs what the run moves")
    L += _section(S, "fleet", when, res.get("fleet"), _fleet,
                  title="## 6. Fleet placement at 512 concurrent sandboxes: image-aware vs random")
    L += _section(S, "relayer", when, res.get("relayer"), _relayer,
                  title="## 7. Re-layering one repository's bases (`prebuild --relayer`): plain vs re-layered")
    L += _section(S, "v0", when, res.get("v0"), _v0,
                  title="## 8. V0 clients: the action execution server's image beside the agent server's")
    from .runtime import render_starts
    L += _section(S, "starts", when, res.get("starts"), render_starts,
                  title="## 9. Starts by what the node holds: warm sandboxes, payloads at join")
    L += _notes()
    (out / "BENCHMARKS.md").write_text("\n".join(L).rstrip() + "\n")

    # plots
    if d:
        plot_derive(d, img / "derive.png")
    if sc or fa:
        plot_throughput(sc, fa, img / "throughput.png")
    if cp:
        plot_copy(cp, img / "copy.png")
    if rt:
        plot_runtime(rt, img / "runtime.png")
    if lk:
        plot_lookup(lk, img / "lookup.png")
