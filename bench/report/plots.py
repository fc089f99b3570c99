"""The PNG plots beside ``docs/BENCHMARKS.md``, one function per figure (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..machine import percentile
from .fmt import TARGET_DERIVE_RATE, TARGET_LOOKUP_P99_MS, TARGET_LOOKUP_RPS, mb, sec


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
