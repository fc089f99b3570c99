"""Section: re-layering at real size (#27): the real-project group, plain vs re-layered."""

from __future__ import annotations

from typing import Any

from ..fmt import mb, sec
from . import Context, Section


def body(res: dict[str, Any], ctx: Context) -> list[str]:
    """The #27 section's markdown: the real-project group, side by side, per variant."""
    L: list[str] = []
    for r in res["variants"]:
        L += _render_variant(r)
    L.append("For scale: Epoch AI rebuilt 2,290 SWE-bench images from 684 GiB to 67 GiB (10×), LogicStar "
             "SWE-bench Verified from 240 GiB to 5 GiB (50×), both from Dockerfiles; here from the images alone, "
             "every tree proven. Target: re-layered own bytes ≤ 1/10 of plain's, peak RSS < 1 GiB, re-layering "
             "≤ 2× the read.")
    L.append("")
    return L


def _render_variant(r: dict[str, Any]) -> list[str]:
    L: list[str] = []
    w = L.append
    w(f"### Dependencies {'as of each release' if r['deps'] == 'release' else 'pinned for the group'}")
    w("")
    bs, rd, p, q = r["base"], r["read"], r["plain"], r["relayered"]
    sizes = rd.get("image_tar_bytes") or []
    w(f"{r['bases']} R2E-shaped images of **{r['project']}** at consecutive releases ({r['releases'][0]} to "
      f"{r['releases'][-1]}), made by buildah from PyPI (`imagefarm.host.projects`): the Debian OS layer "
      "(ADD), `/testbed/.venv` with that release's real dependencies (numpy, pandas, scipy, pytest; RUN pip) "
      "and `/testbed`, a git clone of the sdists committed one release after another (COPY). "
      + (f"Unpacked {mb(min(sizes))} to {mb(max(sizes))} each. " if sizes else "")
      + ("Each venv holds the dependencies as of its release's date (numpy changes nearly every release). "
         if r["deps"] == "release" else "Every venv holds one dependency set (as of the newest release's date). ")
      + "Each side runs in a process of its own; peak RSS is that process's `VmHWM` (/proc).")
    w("")
    w("| | stored (group) | of it, shared by all images | own bytes | ratio vs plain (own) | "
      "node pull, siblings 2..N (mean) | peak RSS | seconds / image |")
    w("|---|---|---|---|---|---|---|---|")
    w(f"| the bases as they are | {mb(bs['stored_bytes'])} | {mb(bs['shared_bytes'])} | {mb(bs['own_bytes'])} | – "
      f"| {mb(bs['sibling_pull_mean'])} | – | – |")
    for name, x in (("plain derive", p), ("re-layered (`--relayer`)", q)):
        if "own_bytes" not in x:
            w(f"| {name} | not measured: `{x.get('error', '?')}` | | | | | | |")
            continue
        ratio = p["own_bytes"] / x["own_bytes"] if "own_bytes" in p and x["own_bytes"] else None
        w(f"| {name} | {mb(x['stored_bytes'])} | {mb(x['shared_bytes'])} | {mb(x['own_bytes'])} | "
          f"{'%.1f×' % ratio if ratio else '–'} | {mb(x['sibling_pull_mean'])} | {mb(x['peak_rss_bytes'])} | "
          f"{sec(x['seconds'] / r['bases'])} |")
    w(f"| reading every layer once (the floor) | {mb(rd.get('blob_bytes', 0))} read, {mb(rd.get('tar_bytes', 0))} "
      f"unpacked | | | | | {mb(rd.get('peak_rss_bytes', 0))} | {sec(rd.get('seconds', 0) / r['bases'])} |")
    if "own_bytes" in q and "own_bytes" in p:
        w("")
        w(f"Stored for the whole group: {mb(p['stored_bytes'])} plain vs {mb(q['stored_bytes'])} re-layered "
          f"({p['stored_bytes'] / q['stored_bytes']:.1f}×); own bytes {p['own_bytes'] / q['own_bytes']:.1f}×. "
          f"Re-layering took {q['seconds'] / max(rd.get('seconds', 0), 1e-9):.1f}× the read pass "
          f"(load {r['loadavg'][0][0]:.1f} → {r['loadavg'][1][0]:.1f}); "
          f"{q['proved_paths']:,} paths proven, {q['mtime_differs']:,} with another mtime than the base's.")
    elif "error" in q:
        w("")
        w("The re-layering side failed in this run:")
        w("")
        w("```")
        w(q.get("traceback", "").strip()[-3000:])
        w("```")
    g = r.get("plan")
    if g:
        w("")
        w(f"`prebuild --plan --relayer` estimated beforehand (listing {len(g['listed'])} of the bases): own bytes "
          f"{mb(g['relayer_own_bytes'])} re-layered vs {mb(g['plain_own_bytes'])} plain, "
          f"{mb(g['relayer_pull_bytes'])} per further sibling (plain {mb(g['plain_pull_bytes'])}).")
    w("")
    return L


SECTION = Section(
    "relayer-real",
    9,
    body,
    title="## 9. Re-layering at real size: 16 buildah-made images of a real project, plain vs re-layered (#27)",
)
