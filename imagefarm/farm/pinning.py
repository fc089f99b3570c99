"""A batch's lockfile: each instance whose base was derived, pinned by digest (base and
prebuilt), with whether its image is verified, merged into what the file already holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from . import attest, jobs
from .batchstate import Outcome
from .catalog import Catalog
from .lockfile import Entry, Lockfile
from imagefarm.errors import ConfigError, ImagefarmError
from imagefarm.names.reference import parse
from imagefarm.settings import Settings


def entries(cat: Catalog, outcomes: dict[str, Outcome], recipe: Any,
            is_verified: Callable[[str, str], bool], holds: Callable[[Outcome], bool] = lambda o: True
            ) -> list[Entry]:
    """One entry per instance whose base was derived; ``is_verified(image, digest)`` is
    asked (once per digest) for images this batch did not check itself, ``holds(outcome)``
    whether the registry confirms what the result says."""
    out, checked = [], {}
    for inst in cat.instances:
        o = outcomes.get(str(inst.base))
        if o is None or not o.ok or not holds(o):
            continue
        verified = o.verified
        if verified is None:
            if o.digest not in checked:
                checked[o.digest] = is_verified(o.image, o.digest)
            verified = checked[o.digest]
        out.append(Entry(inst.instance_id, inst.split, o.base, o.base_digest, o.image, o.digest,
                         recipe.name, recipe.digest, recipe.agent_server_version, bool(verified)))
    return out


def write_lockfile(settings: Settings, cat: Catalog, outcomes: dict[str, Outcome], recipe: Any,
                   path: Path, dataset: str) -> Lockfile:
    """Merge this batch's entries into the lockfile at ``path`` (an unreadable one is
    replaced); an image not checked in this batch counts as verified when the registry
    holds its verification record."""
    old = None
    if Path(path).exists():
        try:
            old = Lockfile.read(path)
        except ConfigError:
            old = None

    def recorded(image: str, digest: str) -> bool:
        return attest.is_verified(jobs.appender(settings).client, parse(image), digest)

    client, seen = jobs.appender(settings).client, {}
    lock = Lockfile.merge(old, entries(cat, outcomes, recipe, recorded, lambda o: result_holds(client, settings, o, seen)),
                          dataset=dataset, to=settings.to)
    lock.write(path)
    return lock


def result_holds(client: Any, settings: Settings, o: Outcome, seen: dict[tuple[str, str], bool]) -> bool:
    """A worker's result is a claim: it enters the lockfile only when its image is under
    ``--to`` and the registry holds that digest there (read back, once per image); else
    the outcome says why it was left out."""
    key = (o.image, o.digest)
    if key not in seen:
        try:
            ref, prefix = parse(o.image), settings.prefix
            under = ref.registry == prefix.registry and (not prefix.path or ref.repository.startswith(prefix.path + "/"))
            desc = client.head_manifest(ref.with_digest(o.digest)) if under else None
            seen[key] = desc is not None and desc.digest in ("", o.digest)
        except ImagefarmError:
            seen[key] = False
    if not seen[key]:
        o.ok, o.stage = False, "lockfile"
        o.error = f"result {o.image}@{o.digest[:19]} is not under --to {settings.to} or not in its registry: left out"
    return seen[key]
