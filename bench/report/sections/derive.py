"""Section: The fast path (manifest surgery) against the naive build, same bases, same registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import plots
from ..fmt import TARGET_RATIO, load, mb, ok, sec
from . import Context, Section


def body(d: dict[str, Any], ctx: Context) -> list[str]:
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


def targets(ctx: Context) -> list[str]:
    d = ctx.res.get("derive")
    if not d:
        return []
    return [f"| fast path vs naive, same run | ≥ {TARGET_RATIO:g}× | {d['ratio']['warm_speedup']:.0f}× "
            f"(1 thread each; {d['ratio']['cold_speedup']:.0f}× counting the one-time payload upload) | "
            f"{ok(d['ratio']['warm_speedup'] >= TARGET_RATIO)} |"]


def plot(ctx: Context, img: Path) -> None:
    if d := ctx.res.get("derive"):
        plots.plot_derive(d, img / "derive.png")


SECTION = Section(
    "derive",
    1,
    body,
    title="## 1. Derive: fast path vs the naive way, same bases, same registry",
    targets=targets,
    target_order=1,
    plot=plot,
)
