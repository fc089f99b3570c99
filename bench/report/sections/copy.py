"""Section: A cold copy of derived images to an empty registry: bytes moved against unique bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import plots
from ..fmt import load, mb, ok, sec
from . import Context, Section


def body(cp: dict[str, Any], ctx: Context) -> list[str]:
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


def targets(ctx: Context) -> list[str]:
    cp = ctx.res.get("copy")
    if not cp:
        return []
    return [f"| agent-server version bump | 0 base bytes moved | {mb(cp['bump']['base_bytes_moved'])} of base "
            f"layers moved re-deriving {cp['bump']['images']} images | {ok(cp['bump']['base_bytes_moved'] == 0)} |",
            f"| cross-registry copy | bytes moved = unique bytes | efficiency {cp['efficiency']:.3f} "
            f"({mb(cp['bytes_moved'])} moved, {mb(cp['unique_bytes'])} unique) | "
            f"{ok(abs(cp['efficiency'] - 1) < 0.01)} |"]


def plot(ctx: Context, img: Path) -> None:
    if cp := ctx.res.get("copy"):
        plots.plot_copy(cp, img / "copy.png")


SECTION = Section(
    "copy",
    2,
    body,
    title="## 2. Cold copy across registries",
    targets=targets,
    target_order=3,
    plot=plot,
)
