"""Cold copy across registries: derive the realistic bases from registry A into an empty
registry B, and compare the bytes that crossed with the unique bytes of the result.

unique bytes = the sum of the distinct blobs the derived manifests in B reference
(shared OS and venv layers once, each /testbed layer, the payload once, every config).
Efficiency = unique / moved: 1.0 means no byte crossed twice. Then a payload change
(a new small layer standing in for an agent-server version bump) over the same images:
every image re-derived, the base bytes moved should be 0.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from imagefarm import oci
from imagefarm.derive import Appender, AppendPayload
from imagefarm.names.reference import parse

from .context import Bench
from .machine import loadavg


def _derive_all(ap: Appender, bases: list[str], payload, to: str, threads: int):
    before = ap.client.stats.total.as_dict()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda x: ap.derive(x, payload, to=to), bases))
    wall = time.perf_counter() - t0
    after = ap.client.stats.total.as_dict()
    return results, wall, {k: after[k] - before[k] for k in after}


def run_copy(b: Bench) -> dict[str, Any]:
    dst = b.registry("b")
    bases = [f.ref for f in b.realistic_set()[:b.plan.copy_bases]]
    payload = b.payload
    to = f"{dst.host}/prebuilt"
    threads = min(4, len(bases))
    load0 = loadavg()
    b.log(f"copy: {len(bases)} bases from registry a to an empty registry b, {threads} threads")
    with Appender(b.settings(to=to)) as ap:
        mark = dst.mark()
        results, wall, st = _derive_all(ap, bases, payload, to, threads)
        traffic = dst.traffic(mark)
        blobs: dict[str, int] = {}
        per_image = []
        for r in results:
            m = ap.client.resolve(parse(r.ref)).manifest
            descs = [m.config, *m.layers]
            per_image.append(sum(d.size for d in descs))
            for d in descs:
                blobs[d.digest] = d.size
        moved = sum(r.bytes_moved for r in results)
        unique = sum(blobs.values())
        b.log(f"  moved {moved / 1e6:.1f} MB, unique {unique / 1e6:.1f} MB in {wall:.1f}s")

        # a payload change: a new (small) layer and recipe digest; the images are re-derived
        bump_dir = b.work / "bump"
        layer = oci.write_layer([oci.dir_entry("agent-server"),
                                 oci.file_entry("agent-server/BENCH-BUMP", b"a stand-in payload change\n")],
                                bump_dir)
        bump = AppendPayload(layer, payload.recipe_name + "-bump",
                             "sha256:" + hashlib.sha256(b"bench-bump" + payload.recipe_digest.encode()).hexdigest(),
                             payload.agent_server_version + ".post1", tuple(payload.env))
        mark2 = dst.mark()
        bres, bwall, _ = _derive_all(ap, bases, bump, to, threads)
        btraffic = dst.traffic(mark2)
        bmoved = sum(r.bytes_moved for r in bres)
        base_layers = set()
        for x in bases:
            base_layers.update(d.digest for d in ap.client.resolve(parse(x)).manifest.layers)
    base_moved = sum(size for d, size in btraffic["pushed"].items() if d in base_layers)
    traffic.pop("pushed")
    btraffic.pop("pushed")
    return {
        "bases": len(bases), "threads": threads, "seconds": wall, "images_per_s": len(bases) / wall,
        "bytes_moved": moved, "unique_bytes": unique, "distinct_blobs": len(blobs),
        "sum_image_bytes": sum(per_image), "efficiency": unique / moved if moved else float("nan"),
        "payload_bytes": payload.layer.size, "blobs_uploaded": sum(r.blobs_uploaded for r in results),
        "requests_per_image": traffic["requests"] / len(bases), "client": st, "registry_log": traffic,
        "bump": {"seconds": bwall, "images": len(bres), "bytes_moved": bmoved, "layer_bytes": layer.size,
                 "base_bytes_moved": base_moved, "registry_log_pushed_bytes": btraffic["pushed_bytes"], "requests_per_image": btraffic["requests"] / len(bres),
                 "skipped": sum(r.skipped for r in bres)},
        "loadavg": [load0, loadavg()],
    }
