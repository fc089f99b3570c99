"""Both recipes in one ``imagefarm prebuild``: tags, annotations, lockfile and lookup keep
them apart, and each image passed the boot check of its own server (the agent server's
API for ``default``, the action execution server's for ``v0``)."""

from __future__ import annotations

import json

import pytest

from imagefarm import oci
from imagefarm.farm.lockfile import Lockfile
from imagefarm.names.reference import parse
from imagefarm.registry import RegistryClient
from imagefarm.serve.lookup import Lookup

from tests.conftest import imagefarm_cli

pytestmark = pytest.mark.slow


def test_prebuild_default_and_v0_in_one_run(settings, cli_env, registry, r2e_base, payload, v0_payload,
                                            tmp_path) -> None:
    to = f"{registry.host}/pb-recipes"
    dataset = tmp_path / "one.jsonl"
    dataset.write_text(json.dumps({"instance_id": "inst-1", "docker_image": r2e_base.ref}) + "\n")
    lockfile = tmp_path / "lock.json"
    p = imagefarm_cli("prebuild", "--dataset", str(dataset), "--to", to, "--recipe", "default", "--recipe", "v0",
                      "--verify", "all", "--lockfile", str(lockfile), "--json", env=cli_env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    batches = json.loads(p.stdout)["batches"]
    assert [(b["recipe"], b["derived"], b["verified"], b["failed"]) for b in batches] == [
        ("default", 1, 1, 0), ("v0", 1, 1, 0)]

    lock = Lockfile.read(lockfile)
    by_recipe = {e.recipe: e for e in lock.entries}
    assert sorted(by_recipe) == ["default", "v0"] and all(e.instance_id == "inst-1" for e in lock.entries)
    assert by_recipe["v0"].agent_server_version == "0.62.0" and by_recipe["default"].agent_server_version == "1.58.2"
    assert "-oh0.62.0-v0-" in by_recipe["v0"].image and "-v0-" not in by_recipe["default"].image
    assert all(e.verified for e in lock.entries)

    with RegistryClient(settings) as client:
        for recipe, built in (("default", payload), ("v0", v0_payload)):
            m = client.resolve(parse(by_recipe[recipe].image)).manifest
            assert m.annotations[oci.ANN_RECIPE] == recipe
            assert m.annotations[oci.ANN_PAYLOAD_DIGEST] == built.layer.digest == m.layers[-1].digest

    lk = Lookup(settings.model_copy(update={"to": to}))
    try:
        assert lk.resolve(r2e_base.ref, recipe="v0").image == by_recipe["v0"].image
        assert lk.resolve(r2e_base.ref).image == by_recipe["default"].image
    finally:
        lk.close()


def test_one_version_for_two_recipes_is_refused(cli_env, tmp_path) -> None:
    dataset = tmp_path / "x.jsonl"
    dataset.write_text('{"docker_image": "127.0.0.1:1/x:1"}\n')
    p = imagefarm_cli("prebuild", "--dataset", str(dataset), "--recipe", "default", "--recipe", "v0",
                      "--agent-server-version", "1.58.2", env=cli_env, timeout=60)
    assert p.returncode == 2 and "--agent-server-version" in p.stderr and "Traceback" not in p.stderr
