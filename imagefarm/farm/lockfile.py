"""The lockfile: every dataset instance pinned to its base and prebuilt digests.

Training reads it to run exactly the images that were built and verified; it is
written atomically (temp file + rename), so a crash never leaves half a lockfile.

One entry per (instance, recipe, agent-server version): images of two versions (an
upgraded trainer beside runs that continue on the old one) live side by side, and a
batch for one version replaces only that version's entries. A question without a
recipe or version means any; the answer is then the verified entry of the newest
version (``rank``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from imagefarm import __version__
from imagefarm.errors import ConfigError
from imagefarm.names.reference import Reference, parse
from imagefarm.settings import version_key

FORMAT = 1


@dataclass(frozen=True)
class Entry:
    instance_id: str
    split: str
    base: str               #: normalised base reference (registry/repo:tag)
    base_digest: str
    image: str              #: prebuilt reference with its tag
    image_digest: str
    recipe: str
    recipe_digest: str
    agent_server_version: str
    verified: bool

    @property
    def pinned(self) -> str:
        return parse(self.image).with_digest(self.image_digest).pinned

    @property
    def key(self) -> tuple[str, str, str]:
        """What one entry stands for: ``merge`` replaces entries with the same key only."""
        return (self.instance_id, self.recipe, self.agent_server_version)

    def wanted(self, recipe: str | None, version: str | None) -> bool:
        return (recipe is None or self.recipe == recipe) and (version is None or self.agent_server_version == version)


def rank(e: Entry) -> tuple:
    """Which entry serves among candidates (highest): verified first, then the newest
    version (then the recipe name, so the choice never depends on file order)."""
    return (e.verified, version_key(e.agent_server_version), e.recipe)


@dataclass(frozen=True)
class Lockfile:
    entries: tuple[Entry, ...]
    dataset: str = ""
    to: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def for_base(self, base: Reference | str, *, recipe: str | None = None,
                 version: str | None = None) -> Entry | None:
        """The entry for ``base`` of ``recipe`` at ``version`` (None: any), the best of
        ``candidates``."""
        found = self.candidates(base, recipe=recipe, version=version)
        return found[0] if found else None

    def candidates(self, base: Reference | str, *, recipe: str | None = None,
                   version: str | None = None) -> list[Entry]:
        """The entries for ``base``, best first: the same full name first, else the same
        repository and tag under another registry's name (a mirror of it, another
        address); then by ``rank``."""
        ref = parse(base) if isinstance(base, str) else base
        name = Reference(ref.registry, ref.repository, ref.tag)
        found = [e for e in self._by_base().get(name.path, ())
                 if (ref.digest is None or e.base_digest == ref.digest) and e.wanted(recipe, version)]
        return sorted(found, key=lambda e: (e.base == str(name), rank(e)), reverse=True)

    def for_instance(self, instance_id: str, *, recipe: str | None = None,
                     version: str | None = None) -> Entry | None:
        """The entry of ``instance_id`` of ``recipe`` at ``version`` (None: any; see ``rank``)."""
        return max((e for e in self._by_instance().get(instance_id, ()) if e.wanted(recipe, version)),
                   key=rank, default=None)

    def versions(self) -> dict[str, int]:
        """Agent-server version -> how many entries hold it (what preflight compares)."""
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.agent_server_version] = out.get(e.agent_server_version, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: version_key(kv[0])))

    def _by_base(self) -> dict[str, list[Entry]]:
        idx = self.__dict__.get("_base_idx")
        if idx is None:
            idx = {}
            for e in self.entries:  # by name without the registry (see ``for_base``)
                idx.setdefault(parse(e.base).path, []).append(e)
            object.__setattr__(self, "_base_idx", idx)
        return idx

    def _by_instance(self) -> dict[str, list[Entry]]:
        idx = self.__dict__.get("_inst_idx")
        if idx is None:
            idx = {}
            for e in self.entries:
                idx.setdefault(e.instance_id, []).append(e)
            object.__setattr__(self, "_inst_idx", idx)
        return idx

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "generated_by": f"imagefarm {__version__}",
            "dataset": self.dataset,
            "to": self.to,
            **({"meta": self.meta} if self.meta else {}),
            "instances": [asdict(e) for e in self.entries],
        }

    def write(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.to_json(), fh, indent=1, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, path: Path) -> "Lockfile":
        try:
            doc = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"lockfile {path} does not exist: write one with `imagefarm prebuild --lockfile {path}`") from None
        except ValueError as exc:
            raise ConfigError(f"lockfile {path} is not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ConfigError(f"lockfile {path}: unknown format {doc.get('format') if isinstance(doc, dict) else '?'} (expected {FORMAT})")
        try:
            entries = tuple(Entry(**e) for e in doc.get("instances", []))
        except TypeError as exc:
            raise ConfigError(f"lockfile {path}: malformed instance entry ({exc})") from None
        return cls(entries, doc.get("dataset", ""), doc.get("to", ""), doc.get("meta") or {})

    @classmethod
    def merge(cls, old: "Lockfile | None", new: Iterable[Entry], **kw: Any) -> "Lockfile":
        """New entries replace old ones with the same (instance, recipe, version) key; the
        rest are kept, so a batch at a second version leaves the first one's entries."""
        by_key = {e.key: e for e in (old.entries if old else ())}
        for e in new:
            by_key[e.key] = e
        return cls(tuple(sorted(by_key.values(), key=lambda e: (e.split, e.instance_id, e.recipe,
                                                                version_key(e.agent_server_version)))), **kw)
