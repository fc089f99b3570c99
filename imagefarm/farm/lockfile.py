"""The lockfile: every dataset instance pinned to its base and prebuilt digests.

Training reads it to run exactly the images that were built and verified; it is
written atomically (temp file + rename), so a crash never leaves half a lockfile.
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
        return f"{parse(self.image).name}@{self.image_digest}"


@dataclass(frozen=True)
class Lockfile:
    entries: tuple[Entry, ...]
    dataset: str = ""
    to: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def for_base(self, base: Reference | str) -> Entry | None:
        """The entry for ``base``: the same full name first, else the same repository and
        tag under another registry's name (a mirror of it, another address)."""
        ref = parse(base) if isinstance(base, str) else base
        name = Reference(ref.registry, ref.repository, ref.tag)
        found = [e for e in self._by_base().get(name.path, ())
                 if ref.digest is None or e.base_digest == ref.digest]
        found.sort(key=lambda e: e.base != str(name))
        return found[0] if found else None

    def for_instance(self, instance_id: str) -> Entry | None:
        return self._by_instance().get(instance_id)

    def _by_base(self) -> dict[str, list[Entry]]:
        idx = self.__dict__.get("_base_idx")
        if idx is None:
            idx = {}
            for e in self.entries:  # by name without the registry (see ``for_base``)
                idx.setdefault(parse(e.base).path, []).append(e)
            object.__setattr__(self, "_base_idx", idx)
        return idx

    def _by_instance(self) -> dict[str, Entry]:
        idx = self.__dict__.get("_inst_idx")
        if idx is None:
            idx = {e.instance_id: e for e in self.entries}
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
        """New entries replace old ones for the same instance; the rest are kept."""
        by_id = {e.instance_id: e for e in (old.entries if old else ())}
        for e in new:
            by_id[e.instance_id] = e
        return cls(tuple(sorted(by_id.values(), key=lambda e: (e.split, e.instance_id))), **kw)
