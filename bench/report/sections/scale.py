"""Section: Appender throughput by threads (the farm's figures follow in ``farm``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import plots
from ..fmt import TARGET_DERIVE_RATE, load, mb, ok, sec
from . import Context, Section


def body(sc: dict[str, Any], ctx: Context) -> list[str]:
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


def targets(ctx: Context) -> list[str]:
    sc = ctx.res.get("scale")
    if not sc:
        return []
    return [f"| derive, base in the target registry | ≥ {TARGET_DERIVE_RATE:g} images/s | "
            f"{sc['best_images_per_s']:.1f} images/s ({sc['best_threads']} threads, {sc['bases']} bases) | "
            f"{ok(sc['best_images_per_s'] >= TARGET_DERIVE_RATE)} |"]


def plot(ctx: Context, img: Path) -> None:
    sc, fa = ctx.res.get("scale"), ctx.res.get("farm")
    if sc or fa:
        plots.plot_throughput(sc, fa, img / "throughput.png")


SECTION = Section(
    "scale",
    1.5,
    body,
    title="### At scale: threads, and the farm",
    targets=targets,
    target_order=0,
    plot=plot,
)
