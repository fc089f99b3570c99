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

With foresight (``foresight=True``, image-aware placement), as the runtime does it now:

* **join-time payloads**: every node pulls the payload when it joins (before its first
  sandbox), so no start waits for the payload layer;
* **warm sandboxes for the next step**: the trainer knows step k+1's instances while
  step k runs and prefetches them with ``warm = samples``: the front sends each image
  to a node by ``placement.prefetch_target`` (what ``Fleet.prefetch`` calls: one
  holding it, else the one with the most slots not yet promised to warm sandboxes),
  which pulls it during step k and boots one sandbox per sample once step k's
  sandboxes have stopped (during the trainer's update, which takes longer than a boot),
  as far as its slots allow. A step-k+1 ``/start`` placed (``place`` prefers a node
  with a warm sandbox of its image) where one waits is ready in ``WARM_HIT_SECONDS``
  (assumed until section 9 measures it); any other start takes the normal path. Step 0 is not foreseen.

    .venv/bin/python -m bench --only fleet     # into docs/BENCHMARKS.md, with the other sections
    .venv/bin/python -m bench.fleet --nodes 64 # other sizes: prints the table
"""

from __future__ import annotations

import argparse
import random
import statistics
from dataclasses import dataclass, field

from imagefarm.runtime.placement import NodeView, place, prefetch_target, slots_needed

MB = 1e6
PAYLOAD_BYTES = 222.4 * MB
PAYLOAD_SECONDS = 24.44 - 5.09
BASE_RATE = 323.3 * MB / (30.74 - 24.44)
BOOT_SECONDS = 5.09
#: /start -> ready of a warm hit: ASSUMED, not yet measured (section 9, `python -m bench --quick --only
#: starts`, did not finish on the loaded machine): a hit answers ready in the /start answer itself
WARM_HIT_SECONDS = 0.10


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
    warm: dict[str, int] = field(default_factory=dict)  #: warm sandboxes per image

    def view(self) -> NodeView:
        return NodeView(self.node_id, self.slots, self.used, frozenset(self.images),
                        warm=frozenset(i for i, k in self.warm.items() if k))


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


def prefetch(fleet: list[SimNode], images: list[str], samples: int, base_bytes: dict[str, float]) -> float:
    """The front's ``/prefetch`` of the next step with ``warm = samples``: each image to a
    node holding it, else the one with the fewest images; pulled during the current step
    (landed by the next), warm sandboxes booted between the steps as slots allow.
    Returns the bytes pulled."""
    pulled = 0.0
    promised: dict[str, int] = {}
    by_id = {n.node_id: n for n in fleet}
    for image in images:
        node = by_id[prefetch_target([n.view() for n in fleet], image, samples, promised).node_id]
        promised[node.node_id] = promised.get(node.node_id, 0) + samples
        node.images.add(image)
        for layer, size, _seconds in layers_of(image, base_bytes):
            if layer not in node.layers:
                node.layers.add(layer)
                node.disk += size
                node.peak_disk = max(node.peak_disk, node.disk)
                pulled += size
        room = node.slots - sum(node.warm.values())
        node.warm[image] = node.warm.get(image, 0) + min(samples, max(0, room))
    return pulled


def simulate(policy: str, *, nodes: int, slots: int, instances: int, samples: int, steps: int, dataset: int,
             seed: int, foresight: bool = False) -> dict:
    rng = random.Random(seed)
    base_bytes = {f"img{i}": rng.uniform(300, 1400) * MB for i in range(dataset)}
    fleet = [SimNode(f"n{i:02d}", slots) for i in range(nodes)]
    by_id = {n.node_id: n for n in fleet}
    prng = random.Random(seed + 1)
    pulled, latencies, full, foreseen, first = 0.0, [], 0, [], []
    if foresight:  # join-time payloads: on every node before its first sandbox
        for n in fleet:
            n.layers.add("payload")
            n.disk = n.peak_disk = PAYLOAD_BYTES
        pulled += PAYLOAD_BYTES * nodes
    plans = [rng.sample(sorted(base_bytes), instances) for _ in range(steps)]
    for step in range(steps):
        chosen = plans[step]
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
        hits = 0
        for node, image in placed:  # all /starts arrive at t=0 (one RL step)
            if node.warm.get(image):
                node.warm[image] -= 1
                ready = WARM_HIT_SECONDS
                hits += 1
            else:
                ready, got = start_on(node, image, 0.0, base_bytes)
                pulled += got
            latencies.append(ready)
            (foreseen if step > 0 else first).append(ready)
        for n in fleet:
            n.warm.clear()  # unused warm sandboxes expire
        if foresight and step + 1 < steps:  # while this step runs, the trainer prefetches the next
            pulled += prefetch(fleet, plans[step + 1], samples, base_bytes)
    out = {"policy": policy + (" + foresight" if foresight else ""), "sandboxes": len(latencies),
           "refused_429": full, "bytes_pulled": pulled, **_quantiles(latencies),
           "peak_node_disk_bytes": max(n.peak_disk for n in fleet),
           "mean_node_disk_bytes": statistics.mean(n.peak_disk for n in fleet)}
    out["first_step"] = _quantiles(first)
    if foreseen:
        out["steps_after_first"] = _quantiles(foreseen)
    return out


def _quantiles(latencies: list[float]) -> dict:
    latencies = sorted(latencies)
    q = statistics.quantiles(latencies, n=100)
    p50 = statistics.median(latencies)
    return {"p50_s": p50, "p99_s": q[98], "max_s": latencies[-1], "p99_over_p50": q[98] / p50}


DEFAULTS = dict(nodes=32, slots=16, instances=64, samples=8, steps=4, dataset=4578, seed=0)


def run_fleet(bench=None) -> dict:
    """The ``fleet`` section of ``python -m bench``: both policies at the default sizes."""
    return {"args": DEFAULTS, "costs": {"payload_bytes": PAYLOAD_BYTES, "payload_seconds": PAYLOAD_SECONDS,
                                        "base_bytes_per_s": BASE_RATE, "boot_seconds": BOOT_SECONDS},
            "warm_hit_seconds": WARM_HIT_SECONDS,
            "results": [simulate(policy, **DEFAULTS) for policy in ("image", "random")],
            "foresight": simulate("image", foresight=True, **DEFAULTS)}


def render_foresight(flt: dict) -> list[str]:
    """The foresight rows of the fleet section (``bench/report.py`` calls this)."""
    if "foresight" not in flt:
        return []
    rows = [*flt["results"], flt["foresight"]]
    later = flt["foresight"]["steps_after_first"]
    return ["With foresight, in the same run: payloads pulled when a node joins, and the next step prefetched with "
            f"`warm` = samples while the current one runs (a warm hit ready in {flt['warm_hit_seconds']:.2f} s: "
            "assumed, not measured yet). p50 / p99 / p99÷p50 of `/start` → ready:", "", table(rows), "",
            f"Foreseen steps: p99 = **{later['p99_over_p50']:.2f} × p50** (target ≤ 2); the first step, which nothing "
            "foresaw, still pulls every base: its spread is the pulls'.", ""]


def table(rows: list[dict]) -> str:
    """The markdown table of ``simulate`` rows (also what the bench report shows)."""
    def q(d: dict | None) -> str:
        return f"{d['p50_s']:.2f} s / {d['p99_s']:.2f} s / {d['p99_over_p50']:.2f}" if d else "-"
    out = ["| placement | sandboxes | bytes pulled | all steps p50 / p99 / p99÷p50 | first step (nothing foreseen) "
           "| later steps (foreseen) | largest node disk | mean node disk |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['policy']} | {r['sandboxes']} | {r['bytes_pulled'] / 1e9:.1f} GB | {q(r)} | "
                   f"{q(r.get('first_step'))} | {q(r.get('steps_after_first'))} | "
                   f"{r['peak_node_disk_bytes'] / 1e9:.1f} GB | {r['mean_node_disk_bytes'] / 1e9:.1f} GB |")
    return "\n".join(out)


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
    rows = [simulate(policy, **args) for policy in ("image", "random")] + [simulate("image", foresight=True, **args)]
    print(f"{a.nodes} nodes x {a.slots} slots, {a.steps} steps of {a.instances} instances x {a.samples} samples "
          f"({a.instances * a.samples} concurrent sandboxes), {a.dataset} distinct images, seed {a.seed}\n")
    print(table(rows))
    ratio = rows[0]["bytes_pulled"] / rows[1]["bytes_pulled"]
    print(f"\nimage-aware pulls {ratio:.3f} of random's bytes (target <= 0.25)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
