"""Base image -> prebuilt image, answered without the source registry.

Training nodes may not reach Docker Hub, so a lookup reads only the target registry
(and, where given, the lockfile): the derived repository is ``<to>/<base repo>``, its
tags start with the base's tag, and the manifest annotations say exactly which base
(``org.opencontainers.image.base.name``/``.digest``) and which recipe it holds.

Caches: a hit is kept for ``ttl`` seconds; a miss re-lists the repository's tags (at
most once per ``miss_ttl``), so an image published a moment ago is found at once.
Manifests are cached by (repository, tag); verification records once seen. Every
cache holds at most ``max_entries`` entries (least recently used go first).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

from cachetools import LRUCache

from imagefarm.farm import attest
from imagefarm import oci
from imagefarm.derive.surgery import names_base
from imagefarm.farm.catalog import image_of
from imagefarm.errors import ImageRefused, ImagefarmError, InvalidReference, NotFound, UnsupportedMedia
from imagefarm.farm.lockfile import Lockfile
from imagefarm.names.reference import Reference, parse
from imagefarm.registry import Manifest, RegistryClient
from imagefarm.settings import Settings


@dataclass(frozen=True)
class LookupHit:
    base: str                  #: normalised base reference (as the derive recorded it)
    base_digest: str
    image: str                 #: derived reference with its tag
    digest: str                #: derived manifest digest
    recipe: str
    recipe_digest: str
    agent_server_version: str
    verified: bool
    source: str = "registry"   #: "registry" or "lockfile"

    @property
    def pinned(self) -> str:
        """``repository@digest``: what a runtime should start."""
        return f"{parse(self.image).name}@{self.digest}"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "pinned": self.pinned}

    @cached_property
    def json_bytes(self) -> bytes:
        """The HTTP answer, serialised once per hit (the warm path sends these bytes)."""
        return json.dumps(self.to_json(), separators=(",", ":")).encode()


def normalise_query(query: Any) -> Reference:
    """A base reference from what users have: a reference string (short or full,
    by tag or digest), a SkyRL/R2E dataset row, or its JSON text."""
    if isinstance(query, str) and query.lstrip().startswith("{"):
        try:
            query = json.loads(query)
        except ValueError as exc:
            raise InvalidReference(f"query looks like JSON but is not: {exc}") from None
    if isinstance(query, dict):
        image, _, _ = image_of(query)
        if not image:
            raise InvalidReference("dataset row has no image (docker_image, image or instance.instance_id)")
        query = image
    return parse(query)


def build_command(base: Reference | str, to: str) -> str:
    return f"imagefarm derive {base} --to {to}"


class Lookup:
    """Thread-safe resolver shared by the CLI, the lookup API and the runtime server."""

    def __init__(self, settings: Settings, *, client: RegistryClient | None = None,
                 lockfile: Lockfile | Path | str | None = None, recipe: Any = None,
                 ttl: float = 60.0, miss_ttl: float = 1.0, max_entries: int = 200_000) -> None:
        from imagefarm.payload.recipe import recipe_for

        self.settings = settings
        self.to = settings.to.rstrip("/")
        self.client = client or RegistryClient(settings)
        self._own_client = client is None
        self.recipe = recipe or recipe_for(settings)
        if lockfile is not None and not isinstance(lockfile, Lockfile):
            lockfile = Lockfile.read(Path(lockfile))
        self.lockfile = lockfile
        self.ttl, self.miss_ttl, self.max_entries = ttl, miss_ttl, max_entries
        self._prefix = parse(f"{self.to}/x:x").name[:-1]  # "registry/path/"
        self._lock = threading.Lock()
        self._hits: OrderedDict[str, tuple[float, LookupHit]] = OrderedDict()
        self._tags: LRUCache[str, tuple[float, list[str]]] = LRUCache(max_entries)
        self._manifests: LRUCache[tuple[str, str], Manifest | None] = LRUCache(max_entries)
        self._verified: LRUCache[str, bool] = LRUCache(max_entries)
        self.stats = {"hits": 0, "misses": 0, "cache_hits": 0, "registry_lookups": 0}

    def close(self) -> None:
        if self._own_client:
            self.client.close()

    # -- public ---------------------------------------------------------------------
    def peek(self, query: str) -> LookupHit | None:
        """A cached answer for exactly this query text, without parsing or I/O (the
        warm path of the HTTP service); None means "ask ``resolve``"."""
        cached = self._hits.get(query)
        if cached and cached[0] > time.monotonic():
            self.stats["cache_hits"] += 1
            self.stats["hits"] += 1
            return cached[1]
        return None

    def resolve(self, query: Any) -> LookupHit | None:
        """The prebuilt image for ``query`` or None; ``InvalidReference`` for bad input."""
        base = normalise_query(query)
        key = str(base)
        now = time.monotonic()
        with self._lock:
            cached = self._hits.get(key)
            if cached and cached[0] > now:
                self.stats["cache_hits"] += 1
                self.stats["hits"] += 1
                return cached[1]
        hit = self._resolve(base)
        with self._lock:
            self.stats["hits" if hit else "misses"] += 1
            if hit:
                # also under the text as asked, so ``peek`` finds it without parsing
                for k in {key, query} if isinstance(query, str) else {key}:
                    self._hits[k] = (now + self.ttl, hit)
                    self._hits.move_to_end(k)
                while len(self._hits) > self.max_entries:
                    self._hits.popitem(last=False)
        return hit

    def resolve_many(self, queries: Iterable[Any], workers: int = 16) -> list[LookupHit | None | ImagefarmError]:
        """Resolve many at once (thousands); bad input comes back as its error."""
        def one(q: Any) -> LookupHit | None | ImagefarmError:
            try:
                return self.resolve(q)
            except ImagefarmError as exc:
                return exc
        qs = list(queries)
        if len(qs) <= 4:
            return [one(q) for q in qs]
        with ThreadPoolExecutor(max_workers=min(workers, len(qs))) as pool:
            return list(pool.map(one, qs))

    def invalidate(self, base: str | None = None) -> None:
        """Forget cached answers (all, or one base's): a publisher calls this."""
        with self._lock:
            if base is None:
                self._hits.clear()
                self._tags.clear()
            else:
                ref = normalise_query(base)
                gone = self._hits.pop(str(ref), None)
                if gone:  # and the same answer cached under the texts it was asked as
                    for k in [k for k, v in self._hits.items() if v[1] is gone[1]]:
                        del self._hits[k]
                self._tags.pop(self._target_repo(ref), None)

    # -- resolution -----------------------------------------------------------------------
    def _target_repo(self, base: Reference) -> str:
        return parse(f"{self.to}/{base.repository}:x").name

    def _resolve(self, base: Reference) -> LookupHit | None:
        own = self._own_image(base)
        if own is not None:
            return own
        if self.lockfile is not None:
            entry = self.lockfile.for_base(base)
            if entry is not None and entry.recipe_digest == self.recipe.digest:
                return LookupHit(entry.base, entry.base_digest, entry.image, entry.image_digest, entry.recipe,
                                 entry.recipe_digest, entry.agent_server_version, entry.verified, "lockfile")
        self.stats["registry_lookups"] += 1
        repo = self._target_repo(base)
        for attempt in range(2):
            tags = self._list_tags(repo, refresh=attempt == 1)
            hit = self._match(base, repo, tags)
            if hit is not None or tags is None:
                return hit
        return None

    def _own_image(self, ref: Reference) -> LookupHit | None:
        """A reference that already names a derived image resolves to itself, under the
        rules a base lookup follows: the current recipe only (``ImageRefused`` otherwise);
        by digest, only once it passed its boot check (a tag is put only after it, or by
        the caller's ``--verify`` choice; a digest may name an image that failed)."""
        if not ref.name.startswith(self._prefix):
            return None
        try:
            got = self.client.get_manifest(ref)
        except (NotFound, UnsupportedMedia):  # absent, or not an image (artifact, too big)
            return None
        if not isinstance(got, Manifest) or oci.ANN_BASE_DIGEST not in got.annotations:
            return None
        ann = got.annotations
        base = ann.get(oci.ANN_BASE_NAME, "its base")
        if ann.get(oci.ANN_RECIPE_DIGEST) != self.recipe.digest:
            raise ImageRefused(
                f"{ref} was built with recipe {ann.get(oci.ANN_RECIPE, '?')} "
                f"({ann.get(oci.ANN_RECIPE_DIGEST, 'no digest')[:19]}), not the current recipe "
                f"{self.recipe.name} ({self.recipe.digest[:19]}): ask for its base {base} instead, "
                f"or rebuild it with `{build_command(base, self.to)}`")
        hit = self._hit(ref, got)
        if ref.digest and not hit.verified:
            raise ImageRefused(
                f"{ref} has not passed its boot check (no verification record "
                f"{attest.record_tag(ref.digest)} beside it): ask for its base {base} or its tag, "
                f"or check it with `imagefarm verify {ref}`")
        return hit

    def _list_tags(self, repo: str, refresh: bool) -> list[str] | None:
        now = time.monotonic()
        with self._lock:
            cached = self._tags.get(repo)
        if cached and (cached[0] > now if not refresh else cached[0] - self.ttl + self.miss_ttl > now):
            return cached[1]
        try:
            tags = self.client.list_tags(parse(f"{repo}:x"))
        except NotFound:
            tags = None
        with self._lock:
            self._tags[repo] = (now + self.ttl, tags or [])
        return tags

    def _match(self, base: Reference, repo: str, tags: list[str] | None) -> LookupHit | None:
        if not tags:
            return None
        head = (base.tag or "sha256_")[:40]
        found: list[tuple[int, LookupHit]] = []
        for tag in sorted(tags):
            if not tag.startswith(head) or tag.endswith(".verified"):
                continue
            ref = parse(f"{repo}:{tag}")
            manifest = self._manifest(ref)
            if manifest is None:
                continue
            ann = manifest.annotations
            if ann.get(oci.ANN_RECIPE_DIGEST) != self.recipe.digest:
                continue
            # the dataset's name, the mirror's, or another address of the registry: the
            # repository, tag (and digest, if asked) decide; the same full name wins
            score = names_base(ann, base)
            if score:
                found.append((score, self._hit(ref, manifest)))
        if not found:
            return None
        found.sort(key=lambda sh: (-sh[0], not sh[1].verified, sh[1].image))
        return found[0][1]

    def _manifest(self, ref: Reference) -> Manifest | None:
        key = (ref.name, ref.tag or "")
        with self._lock:
            if key in self._manifests:
                return self._manifests[key]
        try:
            got = self.client.get_manifest(ref)
        except (NotFound, UnsupportedMedia):  # e.g. an SBOM or signature tagged beside it
            got = None
        manifest = got if isinstance(got, Manifest) else None
        with self._lock:
            self._manifests[key] = manifest
        return manifest

    def _hit(self, ref: Reference, manifest: Manifest) -> LookupHit:
        a = manifest.annotations
        return LookupHit(
            base=a.get(oci.ANN_BASE_NAME, ""), base_digest=a.get(oci.ANN_BASE_DIGEST, ""),
            image=str(Reference(ref.registry, ref.repository, ref.tag)), digest=manifest.digest,
            recipe=a.get(oci.ANN_RECIPE, ""), recipe_digest=a.get(oci.ANN_RECIPE_DIGEST, ""),
            agent_server_version=a.get(oci.ANN_AGENT_VERSION, ""),
            verified=self._is_verified(ref, manifest.digest),
        )

    def _is_verified(self, ref: Reference, digest: str) -> bool:
        with self._lock:
            if self._verified.get(digest):
                return True
        ok = attest.is_verified(self.client, ref, digest)
        if ok:  # only a positive answer is final; a record may appear later
            with self._lock:
                self._verified[digest] = True
        return ok
