"""A batch larger than a public registry's pull budget, against a stand-in that limits
manifest GETs the way Docker Hub does (imagefarm.testing.ratelimited).

What is checked is read from the stand-in's own log of what arrived: no request past
the budget (no 429), never more counted requests in any window than the limit, every
spent budget followed by a pause of the whole window, each base's manifest read once,
bases from another registry derived during the pause, and nothing failed.
"""

from __future__ import annotations

import json

import pytest

from imagefarm.testing.ratelimited import RateLimitedRegistry
from tests.conftest import imagefarm_cli

LIMIT, WINDOW = 8, 10.0
N_LIMITED, N_OTHER = 20, 4


@pytest.fixture(scope="module")
def rl_bases(fixtures):
    return [b.ref for b in fixtures.r2e_set(N_LIMITED + N_OTHER)]


def _dataset(tmp_path, refs):
    path = tmp_path / "bases.jsonl"
    path.write_text("".join(json.dumps({"docker_image": r}) + "\n" for r in refs))
    return path


def _pauses(hits):
    """(start, end) of each pause: from the answer that spent the budget to the next
    counted request that arrived."""
    hits = sorted(hits, key=lambda h: h.t)
    return [(a.t, b.t) for a, b in zip(hits, hits[1:]) if a.remaining == 0]


def _check_budget_kept(rl, n_bases):
    hits = rl.counted()
    assert [h for h in hits if h.status == 429] == []           # paused before the budget ran out
    assert len(hits) == n_bases                                   # each base's manifest read once
    assert len({h.path for h in hits}) == n_bases
    assert rl.max_in_window() <= LIMIT                            # in any window of the stand-in's
    pauses = _pauses(hits)
    assert pauses                                                 # the budget was spent (more bases than budget)
    for start, end in pauses:
        assert end - start >= WINDOW                              # each time, the pause held the window
    return pauses


def _run(cli_env, dataset, to, executor):
    return imagefarm_cli("prebuild", "--dataset", str(dataset), "--to", to, "--executor", executor,
                         "--verify", "none", "--json", env=cli_env, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "celery"])
def test_batch_larger_than_the_budget(executor, cli_env, registry, rl_bases, payload, tmp_path, request):
    # a state dir of its own: no manifest kept by an earlier test saves this batch a pull
    cli_env["IMAGEFARM_STATE_DIR"] = str(tmp_path / "state")
    if executor == "celery":
        workers = request.getfixturevalue("workers")
        workers.start("derive", concurrency=2, name="w0")
        workers.start("derive", concurrency=2, name="w1")
    with RateLimitedRegistry(registry.url, limit=LIMIT, window=WINDOW) as hub, \
            RateLimitedRegistry(registry.url, limit=1000, window=WINDOW) as other:
        limited = [r.replace(registry.host, hub.host) for r in rl_bases[:N_LIMITED]]
        others = [r.replace(registry.host, other.host) for r in rl_bases[N_LIMITED:]]
        dataset = _dataset(tmp_path, limited + others)
        to = f"{registry.host}/rl-{executor}"
        res = _run(cli_env, dataset, to, executor)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        state = json.loads(res.stdout)
        assert state["derived"] == N_LIMITED + N_OTHER and state["failed"] == 0 and state["failures"] == []

        pauses = _check_budget_kept(hub, N_LIMITED)
        # the batch said why it waited, on its progress output
        assert f"{hub.host}: 0 of {LIMIT} pulls left, resuming in" in res.stderr
        assert "log in for a higher limit" in res.stderr
        # bases from the other registry went on while the limited one was paused
        during = [h for h in other.counted() if any(s < h.t < e for s, e in pauses)]
        assert during, (pauses, [h.t for h in other.counted()])

        again = _run(cli_env, dataset, to, executor)
        assert again.returncode == 0, again.stderr[-3000:]
        assert json.loads(again.stdout)["skipped"] == N_LIMITED + N_OTHER
        # ... and spent no pull: the tags were read with HEAD, the manifests from the cache
        assert len(hub.counted()) == N_LIMITED
