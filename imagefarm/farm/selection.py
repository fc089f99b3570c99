"""Which bases a batch verifies (a deterministic sample) and which it re-layers together
(the bases of one repository, in bounded groups): pure functions of the base list."""

from __future__ import annotations

import hashlib

from imagefarm.errors import ConfigError
from imagefarm.names.reference import parse

#: the default of ``IMAGEFARM_RELAYER_GROUP_MAX``: one task per group, so a group is the unit of retry
RELAYER_GROUP_MAX = 32


def hash_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def choose_verify(bases: list[str], verify: str) -> set[str]:
    """``all``, ``none`` or a number N: a deterministic sample of N bases (the same N bases
    on every run, so a re-run verifies what the first one did)."""
    if verify == "all":
        return set(bases)
    if verify == "none":
        return set()
    try:
        n = int(verify)
    except ValueError:
        raise ConfigError(f"--verify must be all, none or a number, not {verify!r}") from None
    return set(sorted(bases, key=hash_of)[:max(0, n)])


def relayer_groups(bases: list[str], size: int = RELAYER_GROUP_MAX) -> list[list[str]]:
    """The bases of one repository (registry and path), in dataset order, in groups of
    at most ``size`` (``IMAGEFARM_RELAYER_GROUP_MAX``): what ``--relayer`` re-layers together."""
    by_repo: dict[str, list[str]] = {}
    for b in bases:
        ref = parse(b)
        by_repo.setdefault(f"{ref.registry}/{ref.repository}", []).append(b)
    return [bs[i:i + size] for bs in by_repo.values() for i in range(0, len(bs), size)]
