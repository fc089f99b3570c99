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


def relayer_groups(bases: list[str], most: int = RELAYER_GROUP_MAX) -> list[list[str]]:
    """The bases of one repository (registry and path), in dataset order, split into
    as few groups of at most ``most`` (``IMAGEFARM_RELAYER_GROUP_MAX``) as it takes, their sizes within one of each other
    (33 bases are 17 + 16, not 32 + a lone base that would take the plain path): what
    ``--relayer`` re-layers together. Largest groups first: the longest tasks start first."""
    by_repo: dict[str, list[str]] = {}
    for b in bases:
        ref = parse(b)
        by_repo.setdefault(f"{ref.registry}/{ref.repository}", []).append(b)
    out = []
    for bs in by_repo.values():
        parts = -(-len(bs) // most)
        cuts = [-(-len(bs) * i // parts) for i in range(parts + 1)]  # the larger parts first
        out += [bs[a:b] for a, b in zip(cuts, cuts[1:])]
    return sorted(out, key=len, reverse=True)
