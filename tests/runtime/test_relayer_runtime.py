"""A re-layered image (#18) started by the runtime server on a node that already holds
a sibling of its group pulls that image's own layer and config, nothing else (read
from the registry's access log; the pulls are podman's)."""

from __future__ import annotations

import uuid

import pytest

from imagefarm.derive import Appender, AppendPayload
from imagefarm.derive.relayer import Relayer
from imagefarm.names.reference import parse
from imagefarm.payload.recipe import recipe_for

from rtkit import sdk_start_body, wait_pod_status

pytestmark = pytest.mark.timeout(300)


def test_start_of_a_sibling_pulls_only_its_own_layer(rt_settings, fixtures, standin_layer, rt_to, registry,
                                                     server_factory, client):
    recipe = recipe_for(rt_settings)
    payload = AppendPayload(standin_layer, recipe.name, recipe.digest, recipe.agent_server_version, ())
    bases = [h.ref for h in fixtures.r2e_history(n=6, files=120)][:3]
    with Appender(rt_settings) as a:
        group = Relayer(a).relayer(bases, payload, to=rt_to)
        sibling = group.results[1]
        config = a.client.get_manifest(parse(sibling.image).with_digest(sibling.digest)).config.digest
    with server_factory() as srv:
        for i in (0, 1):  # the first start pulls the image; the second finds its group on the node
            mark = registry.mark()
            sid = f"relayer-{uuid.uuid4()}"
            r = client.post(f"{srv.url}/start", json=sdk_start_body(bases[i], sid))  # by the base's name
            assert r.status_code == 200, r.text
            assert r.json()["prebuilt_image"].endswith(f"@{group.results[i].digest}")
            wait_pod_status(client, f"{srv.url}/sessions/{sid}")
        gets = [x.path.rsplit("/", 1)[1] for x in registry.accesses(mark)
                if x.method == "GET" and "/blobs/sha256:" in x.path and x.status in (200, 307)]
    assert sorted(gets) == sorted([group.own[1].digest, config]), gets
