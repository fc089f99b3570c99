"""Re-layering one repository's bases (#18): plain derive vs ``--relayer``, same group.

The group is ``FixtureFactory.r2e_history``: commits of one git repository, each base
the shared Debian layer + its checkout (/testbed with .git) + the venv installed for
it, as separate layers. Both ways derive every base with the real payload into the
same registry (separate prefixes). From the derived manifests:

- node pull: the distinct blobs of the group's images (what a node that starts every
  image of the group fetches: a blob it holds is not fetched again);
- stored: the same set, i.e. the compressed bytes the registry keeps for them;
- unique per image: the bytes of blobs no other image of the group references (what
  a node already holding a sibling pulls for one more image).

The re-layering time is the wall time of ``Relayer.relayer`` (read every layer,
choose, write, upload, prove every image), on this machine's cores.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

from imagefarm.derive import Appender
from imagefarm.derive.relayer import Relayer
from imagefarm.host.samples import FixtureFactory
from imagefarm.names.reference import parse

from .context import Bench
from .machine import loadavg


def _figures(client, refs: list[str]) -> dict[str, Any]:
    sizes: dict[str, int] = {}
    per: list[set[str]] = []
    for ref in refs:
        m = client.get_manifest(parse(ref))
        descs = [m.config, *m.layers]
        sizes.update({d.digest: d.size for d in descs})
        per.append({d.digest for d in descs})
    held = Counter(d for p in per for d in p)
    unique = [sum(sizes[d] for d in p if held[d] == 1) for p in per]
    total = sum(sizes.values())
    return {"images": len(refs), "node_pull_bytes": total, "stored_bytes": total,
            "unique_mean_bytes": sum(unique) / len(unique), "unique_max_bytes": max(unique),
            "image_bytes_mean": sum(sum(sizes[d] for d in p) for p in per) / len(per)}


def run_relayer(b: Bench) -> dict[str, Any]:
    n, files = (6, 120) if b.plan.quick else (20, 300)
    reg = b.registry("relayer")
    s = b.settings(to=f"{reg.host}/plain")
    with FixtureFactory(s, reg.host, log=b.log) as f:
        bases = [h.ref for h in f.r2e_history(n=n, files=files)]
    payload = b.payload
    with Appender(s) as ap:
        base = _figures(ap.client, bases)
        t0 = time.perf_counter()
        plain = [ap.derive(x, payload).ref for x in bases]
        plain_s = time.perf_counter() - t0
        load0 = loadavg()
        t0 = time.perf_counter()
        group = Relayer(ap).relayer(bases, payload, to=f"{reg.host}/relayered")
        relayer_s = time.perf_counter() - t0
        load1 = loadavg()
        relayered = [r.ref for r in group.results]
        out = {"bases": n, "files": files, "cores": os.cpu_count(), "loadavg": [load0, load1],
               "base": base, "plain": {**_figures(ap.client, plain), "seconds": plain_s},
               "relayered": {**_figures(ap.client, relayered), "seconds": relayer_s,
                             "bytes_read": group.bytes_read, "common_bytes": group.common.size,
                             "own_mean_bytes": sum(l.size for l in group.own) / len(group.own),
                             "proved_paths": sum(p.paths for p in group.proofs)}}
    b.log(f"relayer: {n} bases, node pull {out['plain']['node_pull_bytes'] / 1e6:.1f} MB plain vs "
          f"{out['relayered']['node_pull_bytes'] / 1e6:.1f} MB re-layered, {relayer_s:.1f}s")
    return out
