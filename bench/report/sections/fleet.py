"""Section: The fleet model: image-aware placement against random at 512 sandboxes."""

from __future__ import annotations

from typing import Any

from ..fmt import mb, ok, sec
from . import Context, Section


def body(flt: dict[str, Any], ctx: Context) -> list[str]:
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
    return L


def targets(ctx: Context) -> list[str]:
    flt = ctx.res.get("fleet")
    if not flt:
        return []
    img_, rnd = flt["results"]
    ratio = img_["bytes_pulled"] / rnd["bytes_pulled"]
    return [f"| fleet placement, 512 sandboxes (model) | image-aware pulls ≤ 1/4 of random's bytes | "
            f"{ratio:.2f} ({mb(img_['bytes_pulled'])} vs {mb(rnd['bytes_pulled'])}) | {ok(ratio <= 0.25)} |"]


SECTION = Section(
    "fleet",
    6,
    body,
    title="## 6. Fleet placement at 512 concurrent sandboxes: image-aware vs random",
    targets=targets,
    target_order=6,
)
