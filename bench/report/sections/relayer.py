"""Section: Re-layering one repository's bases against the plain path."""

from __future__ import annotations

from typing import Any

from ..fmt import load, mb, sec
from . import Context, Section


def body(r: dict[str, Any], ctx: Context) -> list[str]:
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


SECTION = Section(
    "relayer",
    7,
    body,
    title="## 7. Re-layering one repository's bases (`prebuild --relayer`): plain vs re-layered",
)
