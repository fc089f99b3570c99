"""The batch driver's parts on their own: verify sampling, re-layer grouping, the
``Batch`` bookkeeping (submit/apply) over a recording executor, the outcome counts, and
the lockfile entries. No registry, no workers: the real executors are proven end to end
in test_farm.py and test_worker.py; here each part's own edge cases."""

from __future__ import annotations

import itertools

import pytest

from imagefarm.errors import ConfigError
from imagefarm.farm.batchstate import BatchState, Outcome, apply, load_state, save_state
from imagefarm.farm.catalog import Catalog, Instance
from imagefarm.farm.pinning import entries
from imagefarm.farm.prebuild import Batch
from imagefarm.names.reference import parse
from imagefarm.farm.selection import RELAYER_GROUP_MAX, choose_verify, relayer_groups
from imagefarm.settings import Settings

BASES = [f"127.0.0.1:5000/r2e/{repo}:{i}" for repo in ("pandas", "numpy") for i in range(3)]


def test_verify_sample_is_deterministic_and_bounded():
    assert choose_verify(BASES, "all") == set(BASES)
    assert choose_verify(BASES, "none") == set()
    two = choose_verify(BASES, "2")
    assert len(two) == 2 and two <= set(BASES)
    assert choose_verify(list(reversed(BASES)), "2") == two  # order-free: a re-run verifies the same
    assert choose_verify(BASES, "99") == set(BASES) and choose_verify(BASES, "-1") == set()
    with pytest.raises(ConfigError, match="all, none or a number"):
        choose_verify(BASES, "some")


def test_relayer_groups_by_repository_in_order_and_bounded():
    assert relayer_groups(BASES) == [BASES[:3], BASES[3:]]
    other_registry = "127.0.0.1:5001/r2e/pandas:0"
    assert [other_registry] in relayer_groups(BASES + [other_registry])  # registry is part of the key
    many = [f"127.0.0.1:5000/r2e/big:{i}" for i in range(RELAYER_GROUP_MAX + 1)]
    groups = relayer_groups(many)
    assert [len(g) for g in groups] == [17, 16] and sum(groups, []) == many  # no lone base left over


class Recording:
    """An executor that runs nothing: it records what was submitted, with what publish set."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self._ids = itertools.count()

    def _h(self, *call):
        self.calls.append(call)
        return next(self._ids)

    def derive(self, base, publish):
        return self._h("derive", base, publish)

    def relayer(self, bases, publish):
        return self._h("relayer", tuple(bases), tuple(publish))

    def verify(self, image, digest):
        return self._h("verify", image, digest)


def _derived(base: str, skipped: bool = False) -> dict:
    return {"ok": True, "skipped": skipped, "image": base + "-p", "digest": "sha256:" + "a" * 64,
            "base_digest": "sha256:" + "b" * 64}


def _state(n: int) -> BatchState:
    return BatchState("b1", "ds", "127.0.0.1:5000/p", "default", "local", n)


def test_batch_verifies_the_sample_before_tagging_and_counts():
    ex = Recording()
    batch = Batch(_state(3), ex, BASES[:3], to_verify={BASES[0]})
    batch.start()
    assert ex.calls == [("derive", BASES[0], False), ("derive", BASES[1], True), ("derive", BASES[2], True)]
    h0, h1, h2 = list(batch.pending)
    batch.apply(h0, _derived(BASES[0]))
    assert ex.calls[-1] == ("verify", BASES[0] + "-p", "sha256:" + "a" * 64)  # verify follows its derive
    batch.apply(h1, _derived(BASES[1], skipped=True))
    batch.apply(h2, {"ok": False, "error": "manifest unknown"})
    (hv,) = batch.pending
    batch.apply(hv, {"verified": False, "error": "no answer on /alive"})
    s = batch.state
    assert (s.derived, s.skipped, s.failed, s.verified, s.verify_failed) == (1, 1, 1, 0, 1)
    assert s.done == 3 and not batch.pending
    assert [(f["base"], f["stage"]) for f in s.failures] == [(BASES[2], "derive"), (BASES[0], "verify")]
    assert batch.outcomes[BASES[0]].stage == "verify" and batch.outcomes[BASES[2]].error == "manifest unknown"


def test_batch_relayer_group_results_and_fallback():
    ex = Recording()
    groups = {g[0]: g for g in relayer_groups(BASES)}
    batch = Batch(_state(6), ex, BASES, to_verify={BASES[1]}, groups=groups, log=(logged := []).append)
    batch.start()
    assert ex.calls == [("relayer", tuple(BASES[:3]), (BASES[0], BASES[2])),
                        ("relayer", tuple(BASES[3:]), tuple(BASES[3:]))]
    g1, g2 = list(batch.pending)
    batch.apply(g1, {"ok": True, "results": [_derived(b) for b in BASES[:3]]})
    assert ex.calls[-1][0:2] == ("verify", BASES[1] + "-p")  # only the sampled member is verified
    batch.apply(g2, {"ok": False, "error": "tree too large"})  # nothing lost: one by one
    assert ex.calls[-3:] == [("derive", b, True) for b in BASES[3:]]
    assert "tree too large" in logged[0] and batch.state.failed == 0
    assert batch.waiting() == {"verify": 1, "derive": 3}


def test_batch_ask_again_drops_late_answers():
    ex = Recording()
    batch = Batch(_state(1), ex, BASES[:1], to_verify=set())
    batch.start()
    (old,) = batch.pending
    assert batch.ask_again() == 1 and batch.state.resubmitted == 1
    batch.apply(old, _derived(BASES[0]))  # the first answer arrives late: not counted twice
    (new,) = batch.pending
    batch.apply(new, _derived(BASES[0]))
    assert batch.state.derived == 1 and not batch.pending


def test_state_round_trip_and_interrupted_when_its_process_is_gone(tmp_path):
    settings = Settings(state_dir=str(tmp_path / "state"))
    state = _state(2)
    apply(state, Outcome(BASES[0]), "derive", _derived(BASES[0]))
    save_state(settings, state)
    assert load_state(settings) == state and load_state(settings, "b1").derived == 1
    state.pid = 2 ** 22 + 1  # beyond pid_max's default: no such process
    save_state(settings, state)
    assert load_state(settings).status == "interrupted"
    assert load_state(settings, "nope") is None


def test_lockfile_entries_ask_the_registry_once_per_unchecked_digest():
    from types import SimpleNamespace

    cat = Catalog(tuple(Instance(f"i{n}", parse(b), "train", n) for n, b in enumerate([BASES[0], *BASES[:3]])))
    outcomes = {b: Outcome(b) for b in BASES[:3]}
    for b in BASES[:2]:
        apply(_state(3), outcomes[b], "derive", _derived(b))
    outcomes[BASES[1]].verified = False
    asked = []
    recipe = SimpleNamespace(name="default", digest="sha256:" + "c" * 64, agent_server_version="1.0")
    got = entries(cat, outcomes, recipe, lambda image, digest: asked.append(image) or True)
    assert [e.instance_id for e in got] == ["i0", "i1", "i2"]  # i3's base failed: no entry
    assert [e.verified for e in got] == [True, True, False] and asked == [BASES[0] + "-p"]


def test_a_task_naming_a_payload_that_is_not_published_is_refused_with_its_name(monkeypatch, tmp_path):
    """The worker's check of a task's payload: no payload image at ``<to>`` is a
    PayloadError naming where it looked (it was a NameError on this path)."""
    import types

    from imagefarm import oci
    from imagefarm.errors import PayloadError
    from imagefarm.farm import jobs
    from imagefarm.payload import remote
    from imagefarm.settings import Settings

    settings = Settings(state_dir=tmp_path / "state", to="127.0.0.1:5999/pre")
    recipe = types.SimpleNamespace(name="default", digest="sha256:" + "a" * 64)
    layer = oci.Layer(tmp_path / "l", "sha256:" + "b" * 64, 1, "sha256:" + "c" * 64)
    monkeypatch.setattr(jobs, "appender", lambda s: types.SimpleNamespace(client=None))
    monkeypatch.setattr(remote, "find", lambda client, recipe, to: None)
    with pytest.raises(PayloadError, match=r"127\.0\.0\.1:5999/pre/imagefarm-payload:sha256-a{64} does not exist"):
        jobs._check_task_payload(settings, recipe, layer)
