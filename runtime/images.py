"""The node's images: pull once per image, a disk budget, least-recently-used eviction.

Runtimes start pinned images (``repo@sha256:...``): once an image is in the node's
storage it is the same bytes, so presence is remembered and a pull runs at most once
per image however many runtimes wait for it (a ``/stop`` never cancels a pull another
runtime waits on). With a budget (``--image-cache-gib``) images no live runtime uses
are removed least recently used first (``podman image rm``) before a pull that would
pass it; a pull that still meets "no space left on device" evicts every idle image
and tries once more, so a start never fails for space eviction could free. Sizes are
podman's per-image sizes, which count a layer shared by two images in each: the
budget errs on the side of the disk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

from imagefarm.names.reference import parse
from imagefarm.settings import Settings

from .backend import ImageInfo, PodmanBackend
from .errors import BackendError
from .state import Store

log = logging.getLogger("imagefarm.runtime.images")


@dataclass
class Payload:
    """A payload image this node pulls before it reports ready (``imagefarm payload push``)."""

    recipe: str
    agent_server_version: str
    image: str = ""         #: pinned payload image; "" when it could not be found
    size: int = 0
    present: bool = False
    error: str = ""

    def row(self) -> dict[str, object]:
        return {"recipe": self.recipe, "agent_server_version": self.agent_server_version, "image": self.image,
                "present": self.present, **({"error": self.error} if self.error else {})}


@dataclass
class PullStats:
    pulls: int = 0
    bytes: int = 0          #: compressed bytes of the images pulled (their manifests' layers + config)
    evictions: int = 0
    evicted_bytes: int = 0
    cache_bytes: int = 0    #: storage in use by images, as of the last look


class NodeImages:
    def __init__(self, settings: Settings, backend: PodmanBackend, store: Store, *,
                 in_use: Callable[[], set[str]], budget_bytes: int | None = None) -> None:
        self.settings, self.backend, self.store = settings, backend, store
        self.in_use = in_use
        self.budget = budget_bytes
        self.present: set[str] = set()
        self.stats = PullStats()
        self._pulls: dict[str, asyncio.Task] = {}
        self._users: dict[str, str] = {}
        self._room = asyncio.Lock()
        self._lru: dict[str, float] = json.loads(store.meta("image_lru") or "{}")
        self.payloads: list[Payload] = []
        #: set once the payloads are in storage (or failed): other pulls wait for it, so a
        #: payload blob is never fetched twice (an image pull reuses the payload's layer)
        self.payloads_ready = asyncio.Event()
        self.payloads_ready.set()

    async def pull_payloads(self, payloads: list[Payload]) -> None:
        self.payloads = payloads
        try:
            for p in payloads:
                if not p.image:
                    continue
                try:
                    await self.ensure(p.image, size=p.size, first=True)
                    p.present = True
                except BackendError as exc:
                    p.error = str(exc)
                    log.warning("payload %s could not be pulled: %s", p.image, exc)
        finally:
            self.payloads_ready.set()

    # -- what is here -------------------------------------------------------------------
    async def scan(self) -> list[ImageInfo]:
        """Look at the storage: refresh presence (pinned names) and the cache size."""
        images = await self.backend.images()
        self.present = {n for i in images for n in i.names if "@sha256:" in n}
        self.stats.cache_bytes = sum(i.size for i in images)
        return images

    def used(self, image: str) -> None:
        self._lru[image] = time.time()
        self.store.set_meta("image_lru", json.dumps(self._lru))

    # -- pull ---------------------------------------------------------------------------
    async def ensure(self, image: str, *, size: int = 0, policy: str | None = None, first: bool = False) -> bool:
        """Have ``image`` in storage; True when this call (or one it joined) pulled it.
        ``first``: a payload, pulled before everything else."""
        self.used(image)
        if image in self.present:
            return False
        if await self.backend.image_exists(image):
            self.present.add(image)
            return False
        if policy == "Never":
            raise BackendError(f"{image} is not on this node and image_pull_policy is Never")
        pull = self._pulls.get(image)
        if pull is None:  # one pull per image, owned by no runtime
            pull = asyncio.create_task(self._pull(image, size, first), name=f"pull-{image[-12:]}")
            self._pulls[image] = pull
            pull.add_done_callback(lambda _t: self._pulls.pop(image, None))
        await asyncio.shield(pull)
        return True

    def pulling(self) -> set[str]:
        return set(self._pulls)

    async def _pull(self, image: str, size: int, first: bool = False) -> None:
        if not first:
            await self.payloads_ready.wait()
        t0 = time.monotonic()
        await self.make_room(size)
        try:
            await self.backend.pull(image, tls_verify=self._tls_verify(image))
        except BackendError as exc:
            if exc.kind != BackendError.NO_SPACE:
                raise
            log.warning("pulling %s: no space left on the device; evicting every idle image and retrying", image)
            await self.make_room(None)
            await self.backend.pull(image, tls_verify=self._tls_verify(image))
        self.present.add(image)
        self.stats.pulls += 1
        self.stats.bytes += size
        log.info("pulled %s (%d MB) in %.1fs", image, size // 2**20, time.monotonic() - t0)
        if self.budget is not None:
            await self.make_room(0)

    def _tls_verify(self, image: str) -> bool:
        return not parse(image).registry.insecure(self.settings)

    # -- the budget ---------------------------------------------------------------------
    async def make_room(self, need: int | None) -> None:
        """Evict idle images, LRU first, until ``need`` more bytes fit the budget
        (``need=None``: evict every idle image, whatever the budget)."""
        if self.budget is None and need is not None:
            return
        async with self._room:
            images = await self.scan()
            total = sum(i.size for i in images)
            if need is not None and total + need <= self.budget:
                return
            keep = self.in_use() | self.pulling() | {p.image for p in self.payloads if p.image}
            idle = [i for i in images if i.containers == 0 and not keep.intersection(i.names)]
            idle.sort(key=lambda i: max((self._lru.get(n, 0.0) for n in i.names), default=0.0))
            for img in idle:
                if need is not None and total + need <= self.budget:
                    break
                if await self.backend.image_remove(img.id):
                    total -= img.size
                    self.stats.evictions += 1
                    self.stats.evicted_bytes += img.size
                    for n in img.names:
                        self.present.discard(n)
                        self._lru.pop(n, None)
                    log.info("evicted %s (%d MB, idle; cache budget %s)", (img.names or (img.id,))[0],
                             img.size // 2**20, f"{self.budget / 2**30:g} GiB" if self.budget else "none")
            self.store.set_meta("image_lru", json.dumps(self._lru))
            self.stats.cache_bytes = total
            if need is not None and total + need > self.budget:
                log.warning("image cache over budget (%d MB + %d MB > %d MB): what is left is in use",
                            total // 2**20, need // 2**20, self.budget // 2**20)

    async def image_user(self, image: str) -> str:
        if image not in self._users:
            data = await self.backend.image_inspect(image) or {}
            self._users[image] = ((data.get("Config") or {}).get("User") or "").strip()
        return self._users[image]
