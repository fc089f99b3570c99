"""``prebuild --plan`` checked against what the run then moves, from the source
stand-in's own log: layer bytes copied and counted requests (manifest GETs)."""

from __future__ import annotations

import json

import httpx
import pytest

from imagefarm import oci
from imagefarm.names.reference import parse

from imagefarm.host.samples import commit_for
from imagefarm.testing.ratelimited import RateLimitedRegistry
from tests.conftest import imagefarm_cli

N, DONE, UNIQUE = 8, 2, 1_500_000
REPO = "namanjain12/plan_final"


@pytest.fixture(scope="module")
def plan_bases(fixtures):
    return [fixtures.r2e_base(REPO, commit_for(f"plan-{i}"), unique_bytes=UNIQUE).ref for i in range(N)]


def _dataset(path, refs):
    path.write_text("".join(json.dumps({"docker_image": r}) + "\n" for r in refs))
    return path


def _layers(registry, refs) -> set[str]:
    """Layer digests of the bases, read from the upstream registry itself."""
    out = set()
    for r in refs:
        ref = parse(r)
        m = httpx.get(f"{registry.url}/v2/{ref.repository}/manifests/{ref.tag}",
                      headers={"Accept": oci.ACCEPT}).json()
        out |= {d["digest"] for d in m["layers"]}
    return out


def _moved(hub, since: int, layers: set[str]) -> tuple[int, int]:
    """(layer bytes served, counted requests) in the stand-in's log after entry ``since``."""
    hits = hub.log[since:]
    moved = sum(h.sent for h in hits if h.method == "GET" and h.status == 200
                and "/blobs/" in h.path and h.path.rsplit("/", 1)[1] in layers)
    return moved, sum(h.counted for h in hits)


@pytest.mark.slow
def test_plan_matches_what_the_run_moves(cli_env, registry, plan_bases, payload, tmp_path):
    with RateLimitedRegistry(registry.url, limit=100, window=60) as hub:
        refs = [r.replace(registry.host, hub.host) for r in plan_bases]
        to = f"{registry.host}/plan"
        first = imagefarm_cli("prebuild", "--dataset", str(_dataset(tmp_path / "first.jsonl", refs[:DONE])),
                              "--to", to, "--verify", "none", "--json", env=cli_env, timeout=600)
        assert first.returncode == 0, first.stderr[-3000:]
        dataset = _dataset(tmp_path / "all.jsonl", refs)

        before = len(hub.log)
        res = imagefarm_cli("prebuild", "--dataset", str(dataset), "--to", to, "--plan", "--json",
                            "--bandwidth", "1Gbit/s", env=cli_env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        plan = json.loads(res.stdout)
        assert {k: plan["counts"][k] for k in ("total", "done", "to_derive", "failing")} == \
            {"total": N, "done": DONE, "to_derive": N - DONE, "failing": 0}
        assert set(plan["done"]) == set(refs[:DONE])
        src = plan["sources"][hub.host]
        assert (src["account"], src["limit"], src["window"]) == ("anonymous", 100, 60)
        # the plan wrote nothing: no upload or manifest PUT reached the source, nor a new tag the target
        assert not [h for h in hub.log[before:] if h.method not in ("GET", "HEAD")]
        planned_pulls = sum(h.counted for h in hub.log[before:])
        assert src["pulls_spent"] == planned_pulls == N - DONE    # done bases cost a HEAD only
        assert src["pulls_for_run"] == 0 and plan["payload_bytes"] == 0
        human = imagefarm_cli("prebuild", "--dataset", str(dataset), "--to", to, "--plan", env=cli_env)
        assert f"already done {DONE}, to derive {N - DONE}" in human.stdout
        assert "log in for a higher limit" in human.stdout

        layers = _layers(registry, plan_bases)
        start = len(hub.log)
        run = imagefarm_cli("prebuild", "--dataset", str(dataset), "--to", to, "--verify", "none", "--json",
                            env=cli_env, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        state = json.loads(run.stdout)
        assert state["derived"] == N - DONE and state["skipped"] == DONE and state["failed"] == 0
        moved, pulls = _moved(hub, start, layers)
        config_bytes = sum(h.sent for h in hub.log[start:] if "/blobs/" in h.path and h.method == "GET") - moved
        # what is left to copy: the unique layer of each base not done (the shared OS
        # and venv layers came with the first batch)
        assert moved == src["layer_bytes"] and src["layers"] == N - DONE
        assert pulls == 0                                         # the plan's reads served the run
        assert plan["bytes_total"] == src["layer_bytes"]
        print(f"\nplan: {src['layers']} layers {src['layer_bytes']} B, {planned_pulls} pulls; "
              f"run moved {moved} B of layers (+{config_bytes} B of configs), {pulls} pulls")
