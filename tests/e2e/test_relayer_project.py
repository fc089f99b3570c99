"""End to end (#27): the real-project group (requests at four releases, buildah-made)
re-layered with the real payload, every image proven by the engine; the real SDK
client starts one of them through the runtime server by its base's name and the real
agent server runs commands in its /testbed: the release's own package from the venv,
the checkout's git commit being the tag's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from imagefarm import oci
from imagefarm.derive import Appender, AppendPayload
from imagefarm.derive.relayer import Relayer
from imagefarm.host.projects import SMALL
from imagefarm.names.reference import parse
from imagefarm.payload.recipe import recipe_for
from imagefarm.runtime import ServeConfig
from imagefarm.runtime.serve import ServerThread
from imagefarm.serve.lookup import Lookup

SDK_CLIENT = Path(__file__).resolve().parents[1] / "runtime" / "sdk_client.py"
KEY = "e2e-relayer-key"


@pytest.mark.slow
def test_agent_server_runs_in_testbed_of_a_relayered_project_image(settings, project_group, registry, payload,
                                                                   sdk_python, tmp_path):
    to = f"{registry.host}/e2e-relayer"
    st = settings.model_copy(update={"to": to})
    bases = [i.ref for i in project_group]
    with Appender(st) as a:
        group = Relayer(a).relayer(bases, AppendPayload.of(payload, recipe_for(st)), to=to)
        assert len(group.proofs) == len(bases) and group.common is not None
        for r in group.results:
            m = a.client.get_manifest(parse(r.image))
            assert m.digest == r.digest and m.annotations[oci.ANN_RELAYER_GROUP] == group.group
    pick = 1  # a sibling, not the first
    tag = parse(bases[pick]).tag
    lookup = Lookup(st)
    lo = 30000 + os.getpid() % 5000
    cfg = ServeConfig(api_key=KEY, port_range=(lo, lo + 99), state_dir=tmp_path / "rt")
    try:
        with ServerThread(st, cfg, resolver=lookup) as srv:
            # a fresh node pulls the image first (base, common, own and payload layers)
            proc = sdk_python.run(SDK_CLIENT, srv.url, KEY, bases[pick], "--exec", "--startup-timeout=600",
                                  "--also=python -c 'import requests; print(requests.__version__)'",
                                  "--also=git -C /testbed rev-parse HEAD", timeout=900)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    finally:
        lookup.close()
    steps = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    by = {s["step"]: s for s in steps}
    assert by["exec"]["exit_code"] == 0 and "/testbed/.venv" in by["exec"]["stdout"], by["exec"]
    also = [s for s in steps if s["step"] == "also"]
    assert [s["exit_code"] for s in also] == [0, 0], also
    assert also[0]["stdout"].strip().splitlines()[-1] == SMALL.releases[pick]
    assert also[1]["stdout"].strip().splitlines()[-1] == tag
