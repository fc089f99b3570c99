"""Base image -> prebuilt image, answered without the source registry.

Training nodes may not reach Docker Hub, so a lookup reads only the target registry
(and, where given, the lockfile): the derived repository is ``<to>/<base repo>``, its
tags start with the base's tag, and the manifest annotations say exactly which base
(``org.opencontainers.image.base.name``/``.digest``) and which recipe it holds.

Which images match: an image serves a question about ``recipe`` (default: the
settings') at ``version`` (default: the settings' ``agent_server_version``; None:
the newest verified version the base has) only if its annotations name that recipe
and its recipe digest equals that recipe's digest at the image's own version, so a
stale build (an old recipe, or a payload built another way) is never served.

Caches: a hit is kept for ``ttl`` seconds, under (query, recipe, version); a miss
re-lists the repository's tags (at most once per ``miss_ttl``), so an image published
a moment ago is found at once.
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
from imagefarm.errors import (ConfigError, ImageRefused, ImagefarmError, InvalidReference, InvalidRequest,
                              NotFound, UnsupportedMedia)
from imagefarm.farm.lockfile import Lockfile
from imagefarm.names.reference import Reference, Repository, parse
from imagefarm.registry import Manifest, RegistryClient
from imagefarm.settings import Settings, check_version, version_key

#: what a cached answer is filed under: (query text, recipe name, version or None)
Key = tuple[str, str, "str | None"]


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

    @cached_property
    def pinned(self) -> str:
        """``repository@digest``: what a runtime should start (parsed once per hit)."""
        return parse(self.image).with_digest(self.digest).pinned

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "pinned": self.pinned}

    @cached_property
    def json_bytes(self) -> bytes:
        """The HTTP answer, serialised once per hit (the warm path sends these bytes)."""
        return json.dumps(self.to_json(), separators=(",", ":")).encode()


def normalise_query(query: Any) -> Reference:
    """A base reference from what users have: a reference string (short or full,
    by tag or digest), a SkyRL/R2E dataset row, or its JSON text; a ``Reference``
    (parsed at the caller's edge) as it is."""
    if isinstance(query, Reference):
        return query
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


def build_command(base: Reference | str, to: str, version: str | None = None) -> str:
    return f"imagefarm derive {base} --to {to}" + (f" --agent-server-version {version}" if version else "")


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
        #: the recipe a question without one asks for (at the settings' version, if any)
        self.recipe = recipe or recipe_for(settings)
        #: the version a question about ``recipe`` without one asks for; None: the newest verified
        self.version: str | None = settings.agent_server_version
        self._recipes: dict[str, Any] = {self.recipe.name: self.recipe}
        self._digests: dict[tuple[str, str], str] = {}
        if lockfile is not None and not isinstance(lockfile, Lockfile):
            lockfile = Lockfile.read(Path(lockfile))
        self.lockfile = lockfile
        self.ttl, self.miss_ttl, self.max_entries = ttl, miss_ttl, max_entries
        self._prefix = f"{settings.prefix}/"  # "registry/path/"
        self._lock = threading.Lock()
        self._hits: OrderedDict[Key, tuple[float, LookupHit]] = OrderedDict()
        self._tags: LRUCache[Repository, tuple[float, list[str]]] = LRUCache(max_entries)
        self._manifests: LRUCache[tuple[str, str], Manifest | None] = LRUCache(max_entries)
        self._verified: LRUCache[str, bool] = LRUCache(max_entries)
        self.stats = {"hits": 0, "misses": 0, "cache_hits": 0, "registry_lookups": 0}

    def close(self) -> None:
        if self._own_client:
            self.client.close()

    # -- public ---------------------------------------------------------------------
    def peek(self, query: str, *, recipe: str | None = None, version: str | None = None) -> LookupHit | None:
        """A cached answer for exactly this query text, recipe and version, without
        parsing or I/O (the warm path of the HTTP service); None means "ask ``resolve``"."""
        name = recipe or self.recipe.name
        cached = self._hits.get((query, name, version or self._default_version(name)))
        if cached and cached[0] > time.monotonic():
            self.stats["cache_hits"] += 1
            self.stats["hits"] += 1
            return cached[1]
        return None

    def resolve(self, query: Any, *, recipe: str | None = None, version: str | None = None) -> LookupHit | None:
        """The prebuilt image for ``query`` of ``recipe`` (None: the settings') at
        ``version`` (None: the settings', else the newest verified the base has), or
        None; ``InvalidRequest`` (``InvalidReference``) for bad input."""
        base = normalise_query(query)
        rec, version = self.wanted(recipe, version)
        key: Key = (str(base), rec.name, version)
        now = time.monotonic()
        with self._lock:
            cached = self._hits.get(key)
            if cached and cached[0] > now:
                self.stats["cache_hits"] += 1
                self.stats["hits"] += 1
                return cached[1]
        hit = self._resolve(base, rec.name, version)
        with self._lock:
            self.stats["hits" if hit else "misses"] += 1
            if hit:
                # also under the text as asked, so ``peek`` finds it without parsing
                keys = {key, (query, rec.name, version)} if isinstance(query, str) else {key}
                for k in keys:
                    self._hits[k] = (now + self.ttl, hit)
                    self._hits.move_to_end(k)
                while len(self._hits) > self.max_entries:
                    self._hits.popitem(last=False)
        return hit

    def resolve_many(self, queries: Iterable[Any], workers: int = 16, *, recipe: str | None = None,
                     version: str | None = None) -> list[LookupHit | None | ImagefarmError]:
        """Resolve many at once (thousands); bad input comes back as its error."""
        def one(q: Any) -> LookupHit | None | ImagefarmError:
            try:
                return self.resolve(q, recipe=recipe, version=version)
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
                # every recipe's and version's answer, and each under the texts it was asked as
                gone = {id(v[1]) for k, v in self._hits.items() if k[0] == str(ref)}
                for k in [k for k, v in self._hits.items() if id(v[1]) in gone]:
                    del self._hits[k]
                self._tags.pop(self._target_repo(ref), None)

    # -- what is asked for ----------------------------------------------------------------
    def wanted(self, recipe: str | None, version: str | None) -> tuple[Any, str | None]:
        """The recipe (loaded once per name) and version a question asks for, the
        defaults filled in; ``InvalidRequest`` for a bad version or recipe name."""
        if version is not None:
            try:
                check_version(version)
            except ValueError as exc:
                raise InvalidRequest(f"agent-server version {exc}") from None
        name = recipe or self.recipe.name
        version = version if version is not None else self._default_version(name)
        rec = self._recipes.get(name)
        if rec is None:
            from imagefarm.payload.recipe import NAME_RE, load_recipe

            if recipe is not None and not NAME_RE.match(recipe):
                raise InvalidRequest(f"recipe {recipe[:80]!r} is not a recipe name")
            try:
                rec = load_recipe(name, self.settings.recipes_dir)
            except ConfigError as exc:
                raise InvalidRequest(str(exc)) from None
            with self._lock:
                self._recipes[name] = rec
        return rec, version

    def _default_version(self, recipe: str) -> str | None:
        """The settings' version is the settings' recipe's: another recipe (V0's) asked
        without a version gets its newest verified one."""
        return self.version if recipe == self.recipe.name else None

    def digest_at(self, recipe: str, version: str) -> str | None:
        """The digest of recipe ``recipe`` at agent-server ``version`` (None: no such
        recipe here, or no version): what a matching image's annotation must say."""
        key = (recipe, version)
        got = self._digests.get(key)
        if got is None:
            rec = self._recipes.get(recipe)
            try:
                got = rec.at_version(version).digest if rec is not None else ""
            except ConfigError:
                got = ""
            with self._lock:
                self._digests[key] = got
        return got or None

    def _serves(self, recipe: str, recipe_digest: str, version: str, want: str, want_version: str | None) -> bool:
        """An image (by what its annotations or lockfile entry say) answers the question."""
        return (recipe == want and (want_version is None or version == want_version)
                and recipe_digest == self.digest_at(want, version))

    # -- resolution -----------------------------------------------------------------------
    def _target_repo(self, base: Reference) -> Repository:
        return self.settings.prefix.repository(base.repository)

    def _resolve(self, base: Reference, recipe: str, version: str | None) -> LookupHit | None:
        own = self._own_image(base, recipe, version)
        if own is not None:
            return own
        if self.lockfile is not None:
            entry = self._from_lockfile(base, recipe, version)
            if entry is not None:
                return LookupHit(entry.base, entry.base_digest, entry.image, entry.image_digest, entry.recipe,
                                 entry.recipe_digest, entry.agent_server_version, entry.verified, "lockfile")
        self.stats["registry_lookups"] += 1
        repo = self._target_repo(base)
        for attempt in range(2):
            tags = self._list_tags(repo, refresh=attempt == 1)
            hit = self._match(base, repo, tags, recipe, version)
            if hit is not None or tags is None:
                return hit
        return None

    def _from_lockfile(self, base: Reference, recipe: str, version: str | None):
        """The best lockfile entry that serves the question (a stale one, built with
        another digest than its recipe's at its version, leaves the next a chance)."""
        return next((e for e in self.lockfile.candidates(base, recipe=recipe, version=version)
                     if self._serves(e.recipe, e.recipe_digest, e.agent_server_version, recipe, version)), None)

    def _own_image(self, ref: Reference, recipe: str, version: str | None) -> LookupHit | None:
        """A reference that already names a derived image resolves to itself, under the
        rules a base lookup follows: the recipe asked for, its current digest at the
        image's version, and the version asked for, if any (``ImageRefused`` otherwise);
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
        got_version = ann.get(oci.ANN_AGENT_VERSION, "")
        if version is not None and got_version != version:
            raise ImageRefused(
                f"{ref} holds openhands-agent-server {got_version or '(unknown)'}, not {version} as asked: "
                f"ask for its base {base} instead, or build it at {version} with "
                f"`{build_command(base, self.to, version)}`")
        if not self._serves(ann.get(oci.ANN_RECIPE, ""), ann.get(oci.ANN_RECIPE_DIGEST, ""), got_version,
                            recipe, version):
            current = self.digest_at(recipe, got_version) or "none"
            raise ImageRefused(
                f"{ref} was built with recipe {ann.get(oci.ANN_RECIPE, '?')} "
                f"({ann.get(oci.ANN_RECIPE_DIGEST, 'no digest')[:19]}), not the current recipe "
                f"{recipe} at {got_version or '?'} ({current[:19]}): ask for its base {base} instead, "
                f"or rebuild it with `{build_command(base, self.to, got_version or None)}`")
        hit = self._hit(ref, got)
        if ref.digest and not hit.verified:
            raise ImageRefused(
                f"{ref} has not passed its boot check (no verification record "
                f"{attest.record_tag(ref.digest)} beside it): ask for its base {base} or its tag, "
                f"or check it with `imagefarm verify {ref}`")
        return hit

    def _list_tags(self, repo: Repository, refresh: bool) -> list[str] | None:
        now = time.monotonic()
        with self._lock:
            cached = self._tags.get(repo)
        if cached and (cached[0] > now if not refresh else cached[0] - self.ttl + self.miss_ttl > now):
            return cached[1]
        try:
            tags = self.client.list_tags(repo)
        except NotFound:
            tags = None
        with self._lock:
            self._tags[repo] = (now + self.ttl, tags or [])
        return tags

    def _match(self, base: Reference, repo: Repository, tags: list[str] | None, recipe: str,
               version: str | None) -> LookupHit | None:
        if not tags:
            return None
        head = (base.tag or "sha256_")[:40]
        found: list[tuple[int, LookupHit]] = []
        for tag in sorted(tags):
            if not tag.startswith(head) or tag.endswith(".verified"):
                continue
            ref = repo.tag(tag)
            manifest = self._manifest(ref)
            if manifest is None:
                continue
            ann = manifest.annotations
            if not self._serves(ann.get(oci.ANN_RECIPE, ""), ann.get(oci.ANN_RECIPE_DIGEST, ""),
                                ann.get(oci.ANN_AGENT_VERSION, ""), recipe, version):
                continue
            # the dataset's name, the mirror's, or another address of the registry: the
            # repository, tag (and digest, if asked) decide; the same full name wins
            score = names_base(ann, base)
            if score:
                found.append((score, self._hit(ref, manifest)))
        if not found:
            return None
        # the base's own name first, then verified, then the newest version, then by name
        best = max(sh[0] for sh in found)
        cands = [h for score, h in found if score == best]
        rank = {id(h): (h.verified, version_key(h.agent_server_version)) for h in cands}
        top = max(rank.values())
        return min((h for h in cands if rank[id(h)] == top), key=lambda h: h.image)

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
