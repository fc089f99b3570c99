"""Put blobs into a target repository with the fewest bytes moved.

Order of preference for each blob: already known to be there (0 requests); mount
from a repository of the same registry that has it (1 request, 0 bytes); HEAD says
it is there; copy it from the source registry, or upload it from disk (once per
registry: afterwards it is mounted). Work on one blob in one registry is serialised,
so two concurrent derives sharing a base layer copy it once; copies from one source
registry run at most ``settings.copies_per_source`` at a time (a public registry is
not hammered, the others keep their share).

What is remembered lives as long as the ``BlobPlacer`` (one per farm process); the
payload also gets a fixed home repository in each target registry so a new process
mounts it from there instead of uploading it again.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

from imagefarm.errors import NotFound
from imagefarm.oci import Descriptor
from imagefarm.names.reference import Reference
from imagefarm.registry import RegistryClient


class BlobPlacer:
    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self._present: set[tuple[str, str, str]] = set()   # (registry, repo, digest)
        self._homes: dict[tuple[str, str], str] = {}        # (registry, digest) -> repo
        self._locks: dict[tuple[str, str], threading.RLock] = {}
        self._guard = threading.Lock()
        self._per_source: dict[str, threading.BoundedSemaphore] = {}

    def _lock(self, registry: str, digest: str) -> threading.RLock:
        with self._guard:
            return self._locks.setdefault((registry, digest), threading.RLock())

    def known(self, target: Reference, digest: str) -> bool:
        return (target.registry, target.repository, digest) in self._present

    def remember(self, target: Reference, digest: str) -> None:
        self._present.add((target.registry, target.repository, digest))
        self._homes.setdefault((target.registry, digest), target.repository)

    def forget(self, target: Reference) -> None:
        """Drop what we believe about ``target``'s repository (after BLOB_UNKNOWN)."""
        with self._guard:
            self._present = {k for k in self._present if k[:2] != (target.registry, target.repository)}
            self._homes = {k: v for k, v in self._homes.items()
                           if not (k[0] == target.registry and v == target.repository)}

    def ensure(self, target: Reference, desc: Descriptor, *, source: Reference | None = None,
               local: Path | None = None, home: str | None = None,
               scopes: Sequence[str] | None = None) -> None:
        """Make ``desc`` present in ``target``'s repository.

        ``source``: a repository holding it (same or other registry); ``local``: the
        blob file on disk; ``home``: a repository of the target registry to mount from
        (uploaded there first if needed).
        """
        if self.known(target, desc.digest):
            self.client.stats.add(blobs_skipped=1)
            return
        with self._lock(target.registry, desc.digest):
            if self.known(target, desc.digest):
                self.client.stats.add(blobs_skipped=1)
                return
            self._place(target, desc, source, local, home, scopes)
            self.remember(target, desc.digest)

    def _place(self, target, desc, source, local, home, scopes) -> None:
        c = self.client
        if home and home != target.repository and (target.registry, desc.digest) not in self._homes:
            # the payload: make sure its home repository has it, then mount from there
            home_ref = Reference(target.registry, home)
            self.ensure(home_ref, desc, source=source, local=local, scopes=(*(scopes or ()), _push(home)))
        candidates = []
        if source is not None and source.registry == target.registry:
            candidates.append(source.repository)
        if (target.registry, desc.digest) in self._homes:
            candidates.append(self._homes[(target.registry, desc.digest)])
        location = None
        for repo in dict.fromkeys(candidates):
            if repo == target.repository:
                continue
            mounted, location = c.mount_blob(target, desc.digest, repo,
                                             scopes=_with(scopes, target, repo))
            if mounted:
                return
            break  # the registry opened an upload session instead: use it below
        if location is None and c.blob_exists(target, desc.digest, scopes=scopes):
            c.stats.add(blobs_skipped=1)
            return
        if local is not None:
            c.upload_blob(target, desc.digest, local, size=desc.size, location=location, scopes=scopes)
        elif source is not None:
            with self._source_slot(source.registry):  # parallel across bases, capped per source
                c.copy_blob(source, target, desc, location=location, scopes=scopes)
        else:
            raise NotFound(f"blob {desc.digest} is not in {target.name} and there is no source for it")


    def _source_slot(self, registry: str) -> threading.BoundedSemaphore:
        with self._guard:
            sem = self._per_source.get(registry)
            if sem is None:
                sem = self._per_source[registry] = threading.BoundedSemaphore(
                    self.client.settings.copies_per_source)
            return sem


def _push(repo: str) -> str:
    return f"repository:{repo}:pull,push"


def _with(scopes: Sequence[str] | None, target: Reference, repo: str) -> tuple[str, ...]:
    base = tuple(scopes) if scopes else (_push(target.repository),)
    extra = f"repository:{repo}:pull"
    return base if any(s.startswith(f"repository:{repo}:") for s in base) else (*base, extra)
