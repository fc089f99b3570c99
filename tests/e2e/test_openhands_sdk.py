"""End to end: the real OpenHands SDK client starts a real prebuilt agent-server image
through imagefarm's runtime server, runs a command in /testbed, and stops it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagefarm.derive import Appender, AppendPayload
from imagefarm.serve.lookup import Lookup
from imagefarm.payload.recipe import recipe_for
from imagefarm.runtime import ServeConfig
from imagefarm.runtime.serve import ServerThread
from imagefarm.host.samples import R2E_REPOS

SDK_CLIENT = Path(__file__).resolve().parents[1] / "runtime" / "sdk_client.py"
KEY = "e2e-runtime-key"


@pytest.mark.slow
def test_api_remote_workspace_runs_in_testbed(settings, fixtures, registry, payload, sdk_python, tmp_path):
    to = f"{registry.host}/e2e"
    st = settings.model_copy(update={"to": to})
    # tornado_final's /testbed holds tornado.py: the agent server must not import it
    base = fixtures.r2e_base(R2E_REPOS[4], "7" * 40)
    with Appender(st) as appender:
        derived = appender.derive(base.ref, AppendPayload.of(payload, recipe_for(st)), to=to)
    lookup = Lookup(st)
    cfg = ServeConfig(api_key=KEY, port_range=(38100, 38199), state_dir=tmp_path / "rt")
    try:
        with ServerThread(st, cfg, resolver=lookup) as srv:
            proc = sdk_python.run(SDK_CLIENT, srv.url, KEY, base.ref, "--exec", timeout=600)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    finally:
        lookup.close()
    steps = {s["step"]: s for s in (json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{"))}
    assert steps["ready"]["alive"] is True
    out = steps["exec"]["stdout"]
    assert steps["exec"]["exit_code"] == 0, out
    assert "from-sdk" in out
    assert "/testbed/.venv" in out  # the agent's python is the base's venv
    path_line = next(line for line in out.splitlines() if line.startswith("PATH="))
    assert path_line.startswith("PATH=/testbed/.venv/bin:")  # the base's PATH comes first
    assert "/agent-server" not in path_line.split(":")[0]
    assert steps["stopped"]["runtime_id"] == steps["ready"]["runtime_id"]
    assert derived.digest.startswith("sha256:")
