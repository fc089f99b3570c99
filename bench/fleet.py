"""Fleet placement at 512 concurrent sandboxes: image-aware vs random, side by side.

A model, fed with costs measured on this machine (docs/BENCHMARKS.md, section 3,
`python -m bench --only runtime`), and driven by the front's own placement function
(``imagefarm.runtime.placement.place``) exactly as the front calls it: one decision
per ``/start``, each seeing the slots and images the previous ones took.

* An RL step starts ``instances x samples`` sandboxes at once (SkyRL: 64 prompts x 8
  samples = 512), in a shuffled order, on ``nodes`` nodes of ``slots`` slots; a step's
  sandboxes are stopped before the next step; instances are drawn at random from
  ``dataset`` distinct images (R2E-Gym-Subset: 4,578).
* An image = its base layer (300 MB to 1.4 GB compressed, uniform, as the issue says
  of r2e images) + the payload layer every image shares (222.4 MB compressed,
  measured). A node pulls a layer at most once (podman shares layers), one pull at a
  time (its disk and link are the bottleneck); a layer being pulled is waited for.
* Measured costs: a cold start with nothing on the node took 30.74 s, with the base
  there (payload pulled) 24.44 s, warm 5.09 s (p50, same image). So the payload layer
  costs 24.44 - 5.09 = 19.35 s (706.9 MB of small files unpacked) and the 323.3 MB
  base 30.74 - 24.44 = 6.30 s: bases are modelled at 323.3 MB / 6.30 s = 51.3 MB/s,
  the payload at its measured 19.35 s; then the agent server boots in 5.09 s.

Outputs per policy: bytes pulled from the registry, start-to-ready p50/p99, the
largest node's disk (compressed bytes of the layers it holds; with no cache budget
that is after the last step).

    .venv/bin/python -m bench --only fleet     # into docs/BENCHMARKS.md, with the other sections
    .venv/bin/python -m bench.fleet --nodes 64 # other sizes: prints the table
"""

from __future__ import annotations

import argparse
import random
import statistics
from dataclasses import dataclass, field

from imagefarm.runtime.placement import NodeView, place, slots_needed

MB = 1e6
PAYLOAD_BYTES = 222.4 * MB
PAYLOAD_SECONDS = 24.44 - 5.09
BASE_RATE = 323.3 * MB / (30.74 - 24.44)
BOOT_SECONDS = 5.09


@dataclass
class SimNode:
    node_id: str
    slots: int
    used: float = 0.0
    layers: set[str] = field(default_factory=set)     #: on disk
    pulling: dict[str, float] = field(default_factory=dict)  #: layer -> time it lands
    busy_until: float = 0.0                            #: its one pull at a time
    disk: float = 0.0
    peak_disk: float = 0.0
    images: set[str] = field(default_factory=set)      #: what the front believes it holds

    def view(self) -> NodeView:
        return NodeView(self.node_id, self.slots, self.used, frozenset(self.images))


def layers_of(image: str, base_bytes: dict[str, float]) -> list[tuple[str, float, float]]:
    """(layer, bytes, seconds to pull) of an image: its base, then the payload."""
    b = base_bytes[image]
    return [(f"base:{image}", b, b / BASE_RATE), ("payload", PAYLOAD_BYTES, PAYLOAD_SECONDS)]


def start_on(node: SimNode, image: str, now: float, base_bytes: dict[str, float]) -> tuple[float, float]:
    """When the sandbox is ready, and the bytes its node pulled for it."""
    ready_image, pulled = now, 0.0
    for layer, size, seconds in layers_of(image, base_bytes):
        if layer in node.layers:
            continue
        if layer in node.pulling:
            ready_image = max(ready_image, node.pulling[layer])
            continue
        begin = max(now, node.busy_until)
        node.busy_until = done = begin + seconds
        node.pulling[layer] = done
        node.disk += size
        node.peak_disk = max(node.peak_disk, node.disk)
        pulled += size
        ready_image = max(ready_image, done)
    return ready_image + BOOT_SECONDS, pulled


def simulate(policy: str, *, nodes: int, slots: int, instances: int, samples: int, steps: int, dataset: int,
             seed: int) -> dict:
    rng = random.Random(seed)
    base_bytes = {f"img{i}": rng.uniform(300, 1400) * MB for i in range(dataset)}
    fleet = [SimNode(f"n{i:02d}", slots) for i in range(nodes)]
    by_id = {n.node_id: n for n in fleet}
    prng = random.Random(seed + 1)
    pulled, latencies, full = 0.0, [], 0
    for step in range(steps):
        chosen = rng.sample(sorted(base_bytes), instances)
        starts = [img for img in chosen for _ in range(samples)]
        rng.shuffle(starts)
        for n in fleet:  # the previous step's pulls have landed; its sandboxes were stopped
            n.layers |= set(n.pulling)
            n.pulling.clear()
            n.used, n.busy_until = 0.0, 0.0
        placed = []
        for image in starts:
            need = slots_needed(1)
            v = place([n.view() for n in fleet], image, need, policy=policy, rng=prng)  # type: ignore[arg-type]
            if v is None:
                full += 1
                continue
            node = by_id[v.node_id]
            node.used += need
            node.images.add(image)
            placed.append((node, image))
        for node, image in placed:  # all /starts arrive at t=0 (one RL step)
            ready, got = start_on(node, image, 0.0, base_bytes)
            pulled += got
            latencies.append(ready)
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    return {"policy": policy, "sandboxes": len(latencies), "refused_429": full, "bytes_pulled": pulled,
            "p50_s": statistics.median(latencies), "p99_s": q[98], "max_s": latencies[-1],
            "peak_node_disk_bytes": max(n.peak_disk for n in fleet),
            "mean_node_disk_bytes": statistics.mean(n.peak_disk for n in fleet)}


DEFAULTS = dict(nodes=32, slots=16, instances=64, samples=8, steps=4, dataset=4578, seed=0)


def run_fleet(bench=None) -> dict:
    """The ``fleet`` section of ``python -m bench``: both policies at the default sizes."""
    return {"args": DEFAULTS, "costs": {"payload_bytes": PAYLOAD_BYTES, "payload_seconds": PAYLOAD_SECONDS,
                                        "base_bytes_per_s": BASE_RATE, "boot_seconds": BOOT_SECONDS},
            "results": [simulate(policy, **DEFAULTS) for policy in ("image", "random")]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=DEFAULTS["nodes"])
    p.add_argument("--slots", type=int, default=DEFAULTS["slots"], help="slots per node (128 CPUs / 8 per agent)")
    p.add_argument("--instances", type=int, default=DEFAULTS["instances"])
    p.add_argument("--samples", type=int, default=DEFAULTS["samples"])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--dataset", type=int, default=DEFAULTS["dataset"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    a = p.parse_args(argv)
    if min(a.nodes, a.slots, a.instances, a.samples, a.steps, a.dataset) < 1 or a.instances > a.dataset:
        p.error("every size must be at least 1, and --instances at most --dataset")
    args = dict(nodes=a.nodes, slots=a.slots, instances=a.instances, samples=a.samples, steps=a.steps,
                dataset=a.dataset, seed=a.seed)
    rows = [simulate(policy, **args) for policy in ("image", "random")]
    print(f"{a.nodes} nodes x {a.slots} slots, {a.steps} steps of {a.instances} instances x {a.samples} samples "
          f"({a.instances * a.samples} concurrent sandboxes), {a.dataset} distinct images, seed {a.seed}\n")
    print("| placement | sandboxes | bytes pulled | start→ready p50 | p99 | largest node disk | mean node disk |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['sandboxes']} | {r['bytes_pulled'] / 1e9:.1f} GB | {r['p50_s']:.1f} s | "
              f"{r['p99_s']:.1f} s | {r['peak_node_disk_bytes'] / 1e9:.1f} GB | {r['mean_node_disk_bytes'] / 1e9:.1f} GB |")
    ratio = rows[0]["bytes_pulled"] / rows[1]["bytes_pulled"]
    print(f"\nimage-aware pulls {ratio:.3f} of random's bytes (target <= 0.25)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
