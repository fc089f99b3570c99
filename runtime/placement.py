"""Where a runtime goes: a pure function of the nodes' state, shared by the front and bench/.

Image-aware (the default): among nodes with room (``admits``: the one rule a node
applies too), one with a warm sandbox of the image, else one that already holds the
image or is pulling it (so the samples of one instance follow
the first onto its node while it has room), the least loaded of those; otherwise the
least loaded node with room. Least loaded = the most free slots (fewest images on a
tie: the smallest disk, then the node id, so a burst is placed deterministically). ``random``:
any node with room, for comparison (bench/fleet.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterable, Literal

Policy = Literal["image", "random"]


@dataclass(frozen=True)
class NodeView:
    node_id: str
    slots: int
    used: float
    images: frozenset[str]
    ready: bool = True
    warm: frozenset[str] = frozenset()  #: images with a warm sandbox waiting there

    @property
    def free(self) -> float:
        return self.slots - self.used


def slots_needed(resource_factor: float) -> float:
    """A runtime takes ``resource_factor`` slots (a slot = ``--cpus-per-factor`` CPUs and
    ``--memory-mib-per-factor`` MiB); fractions round up to a quarter."""
    return math.ceil(resource_factor * 4) / 4


def admits(slots: float, used: float, resource_factor: float) -> bool:
    """THE admission rule, for a front placing a runtime and for the node taking it: a
    runtime of ``resource_factor`` fits when the node's free slots cover what it needs."""
    return slots - used >= slots_needed(resource_factor)


def node_slots(cpus: float, memory_mib: float, cpus_per_factor: float, memory_mib_per_factor: float) -> int:
    """Slots of a node: what its CPUs and its memory both allow."""
    return max(0, int(min(cpus / cpus_per_factor, memory_mib / memory_mib_per_factor)))


def place(nodes: Iterable[NodeView], image: str, resource_factor: float, *, policy: Policy = "image",
          rng: random.Random | None = None) -> NodeView | None:
    """The node for a runtime of ``image`` and ``resource_factor``, or None when all are full."""
    fits = [n for n in nodes if n.ready and admits(n.slots, n.used, resource_factor)]
    if not fits:
        return None
    if policy == "random":
        return (rng or random).choice(fits)
    holding = [n for n in fits if image in n.images]
    warm = [n for n in holding if image in n.warm]
    pool = warm or holding or fits
    return max(pool, key=lambda n: (n.free, -len(n.images), n.node_id))
