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

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from imagefarm.derive import Appender
from imagefarm.derive.relayer import Relayer
from imagefarm.host.samples import FixtureFactory
from imagefarm.names.reference import parse

from .context import REPO, Bench
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


# -- #27: the real-project group (buildah-made images of 16 xarray releases) ---------------------
def _blobs(client, refs: list[str]) -> tuple[dict[str, int], list[list[str]]]:
    """Blob sizes and, per image in order, its blobs (config + layers), from its manifest."""
    sizes: dict[str, int] = {}
    per: list[list[str]] = []
    for ref in refs:
        m = client.get_manifest(parse(ref))
        descs = [m.config, *m.layers]
        sizes.update({d.digest: d.size for d in descs})
        per.append([d.digest for d in descs])
    return sizes, per


def group_figures(client, refs: list[str], shared: set[str] | None = None) -> dict[str, Any]:
    """Stored bytes (distinct blobs), the part every image shares either way (``shared``:
    the bases' common OS layer and the payload; default: what all of ``refs`` hold),
    the rest ("own": for re-layered images that includes the common layer), and what a
    node that starts the images in order pulls for each after the first."""
    sizes, per = _blobs(client, refs)
    everyone = (set(per[0]).intersection(*map(set, per[1:])) if shared is None else shared) & set(sizes)
    held: set[str] = set(per[0])
    pulls = []
    for p in per[1:]:
        pulls.append(sum(sizes[d] for d in set(p) - held))
        held |= set(p)
    stored = sum(sizes.values())
    shared = sum(sizes[d] for d in everyone)
    return {"images": len(refs), "stored_bytes": stored, "shared_bytes": shared, "own_bytes": stored - shared,
            "sibling_pull_bytes": pulls, "sibling_pull_mean": sum(pulls) / max(1, len(pulls)),
            "image_bytes_mean": sum(sum(sizes[d] for d in p) for p in per) / len(per)}


def _child_spec(b: Bench, bases: list[str], to: str, payload) -> Path:
    spec = b.work / f"relayer-real-{len(list(b.work.glob('relayer-real-*.json')))}.json"
    spec.write_text(json.dumps({
        "state_dir": str(b.state_dir), "to": to, "bases": bases, "layer": payload.layer.to_json(),
        "recipe_name": payload.recipe_name, "recipe_digest": payload.recipe_digest,
        "agent_server_version": payload.agent_server_version, "env": list(payload.env)}))
    return spec


def _in_child(b: Bench, mode: str, spec: Path) -> dict[str, Any]:
    """One side in a process of its own: its peak RSS is its own (VmHWM from /proc)."""
    proc = subprocess.run([sys.executable, "-m", "bench.relayer", mode, str(spec)], capture_output=True,
                          text=True, cwd=REPO, timeout=6 * 3600)
    (b.work / f"relayer-real-{mode}.log").write_text(proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        return {"error": f"{mode} exited {proc.returncode}", "traceback": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_relayer_real(b: Bench) -> dict[str, Any]:
    """Plain derive vs ``--relayer`` on the real-project group (``projects.LARGE``, or its
    first 4 with --quick), twice: dependencies as of each release (they drift) and one
    dependency set for the group. Each side in its own process, beside one pass reading
    every layer once (the floor re-layering is held against) and ``--plan --relayer``'s
    estimate."""
    from imagefarm.host.projects import LARGE

    project = LARGE.head(4) if b.plan.quick else LARGE
    return {"variants": [_real_group(b, p) for p in (project, project.pinned())]}


def _real_group(b: Bench, project) -> dict[str, Any]:
    from imagefarm.farm.plan import make_plan
    from imagefarm.host.projects import ProjectImages

    reg = b.registry(f"relayer-real-{project.deps}")
    s = b.settings(to=f"{reg.host}/plain")
    t0 = time.perf_counter()
    with ProjectImages(s, reg.host, log=b.log) as f:
        bases = [i.ref for i in f.push(project)]
    fixture_s = time.perf_counter() - t0
    payload = b.payload
    ds = b.work / f"relayer-real-{project.deps}.txt"
    ds.write_text("".join(f"{x}\n" for x in bases))
    plan = make_plan(b.settings(to=f"{reg.host}/relayered"), str(ds), relayer=True)
    with Appender(s) as ap:
        base = group_figures(ap.client, bases)
        _, per = _blobs(ap.client, bases)
    shared = set(per[0]).intersection(*map(set, per[1:])) | {payload.layer.digest}
    read = _in_child(b, "read", _child_spec(b, bases, "", payload))
    plain = _in_child(b, "plain", _child_spec(b, bases, f"{reg.host}/plain", payload))
    load0 = loadavg()
    relayered = _in_child(b, "relayer", _child_spec(b, bases, f"{reg.host}/relayered", payload))
    load1 = loadavg()
    with Appender(s) as ap:
        for side in (plain, relayered):
            if "images" in side:
                side.update(group_figures(ap.client, side["images"], shared))
    if "own_bytes" in relayered:
        b.log(f"relayer-real ({project.deps}): own bytes {plain['own_bytes'] / 1e6:.0f} MB plain vs "
              f"{relayered['own_bytes'] / 1e6:.0f} MB re-layered")
    return {"project": project.name, "deps": project.deps, "releases": list(project.releases),
            "bases": len(bases), "cores": os.cpu_count(), "loadavg": [load0, load1], "fixture_seconds": fixture_s,
            "base": base, "read": read, "plain": plain, "relayered": relayered,
            "plan": plan.groups[0].__dict__ if plan.groups else None}


def _vmhwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _child(mode: str, spec_path: str) -> None:
    from imagefarm import oci
    from imagefarm.derive import AppendPayload
    from imagefarm.farm.relayerplan import listing
    from imagefarm.settings import Settings

    spec = json.loads(Path(spec_path).read_text())
    s = Settings.load(state_dir=spec["state_dir"], **({"to": spec["to"]} if spec["to"] else {}))
    payload = AppendPayload(oci.Layer.from_json(spec["layer"]), spec["recipe_name"], spec["recipe_digest"],
                            spec["agent_server_version"], tuple(spec["env"]))
    bases = spec["bases"]
    out: dict[str, Any] = {}
    with Appender(s) as ap:
        t0 = time.perf_counter()
        if mode == "read":  # every distinct layer once: streamed, decompressed, tar walked, files hashed
            seen: dict[str, Any] = {}
            for x in bases:
                for d in ap.client.get_manifest(parse(x)).layers:
                    seen.setdefault(d.digest, (x, d))
            got = {dg: listing(ap.client, parse(x), [d]) for dg, (x, d) in seen.items()}
            out = {"layers": len(got), "blob_bytes": sum(g.blob_bytes for g in got.values()),
                   "tar_bytes": sum(g.tar_bytes for g in got.values()),
                   "image_tar_bytes": [sum(got[d.digest].tar_bytes for d in ap.client.get_manifest(parse(y)).layers)
                                       for y in bases],
                   "files": sum(len(g.files) for g in got.values())}
        elif mode == "plain":
            out = {"images": [ap.derive(x, payload).ref for x in bases]}
        else:
            group = Relayer(ap).relayer(bases, payload, to=spec["to"])
            out = {"images": [r.ref for r in group.results], "bytes_read": group.bytes_read,
                   "common_bytes": group.common.size if group.common else 0,
                   "own_layer_bytes": [o.size for o in group.own], "lower": group.lower,
                   "proved_paths": sum(p.paths for p in group.proofs),
                   "mtime_differs": sum(p.mtime_differs for p in group.proofs)}
        out["seconds"] = time.perf_counter() - t0
    out["peak_rss_bytes"] = _vmhwm()
    print(json.dumps(out))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
