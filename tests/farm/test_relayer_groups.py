"""How ``prebuild --relayer`` groups a whole dataset (#27): by repository (registry and
path), balanced splits of at most the cap, largest first. A unit: no services."""

from __future__ import annotations

from imagefarm.farm.selection import RELAYER_GROUP_MAX, relayer_groups


def _refs(host: str, repo: str, n: int) -> list[str]:
    return [f"{host}/namanjain12/{repo}_final:{i:040x}" for i in range(n)]


def test_groups_by_repository_balanced_largest_first():
    pandas = _refs("127.0.0.1:5000", "pandas", 70)
    numpy = _refs("127.0.0.1:5000", "numpy", 33)
    mirror = _refs("127.0.0.1:5001", "numpy", 2)  # same path, another registry: another group
    lone = _refs("127.0.0.1:5000", "tornado", 1)
    mixed = [x for row in zip(pandas, numpy + mirror + lone + [None] * 70) for x in row if x]
    groups = relayer_groups(mixed)
    assert sorted(len(g) for g in groups) == [1, 2, 16, 17, 23, 23, 24]
    assert [len(g) for g in groups] == sorted((len(g) for g in groups), reverse=True)
    assert all(len(g) <= RELAYER_GROUP_MAX for g in groups)
    # every base exactly once, each group one repository, dataset order kept inside it
    assert sorted(b for g in groups for b in g) == sorted(mixed)
    for g in groups:
        assert len({b.rsplit(":", 1)[0] for b in g}) == 1
        assert g == [b for b in mixed if b in set(g)]
    assert {tuple(g) for g in groups if g[0].startswith("127.0.0.1:5001")} == {tuple(mirror)}


def test_a_cap_of_one_group_per_repository():
    bases = _refs("r.local:5000", "pillow", 64)
    assert [len(g) for g in relayer_groups(bases)] == [32, 32]
    assert [len(g) for g in relayer_groups(bases, most=64)] == [64]
