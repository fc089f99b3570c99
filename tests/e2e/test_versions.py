"""Two openhands-agent-server versions from PyPI side by side (#20), all real: both
payloads built (cached under ~/.cache/imagefarm), both prebuilt onto the same base by
two `imagefarm prebuild` batches into one lockfile, then served by the lookup and the
runtime server to the real APIRemoteWorkspace of each version, and checked against
trainer environments of each version by `imagefarm launch preflight`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from imagefarm.farm.lockfile import Lockfile
from imagefarm.host.samples import R2E_REPOS
from imagefarm.runtime import ServeConfig
from imagefarm.runtime.serve import ServerThread
from imagefarm.serve.lookup import Lookup
from tests.conftest import TEST_RECIPES, imagefarm_cli

#: the recipe's own version, and an older one whose SDK clients still talk to its server
#: (both resolve under the recipe's one exclude_newer date)
OLD, NEW = "1.57.0", "1.58.2"
SDK_CLIENT = Path(__file__).resolve().parents[1] / "runtime" / "sdk_client.py"
KEY = "versions-runtime-key"
pytestmark = pytest.mark.slow


def _log(m: str) -> None:
    print(m, file=sys.stderr)


@pytest.fixture(scope="module")
def sdk_old_python(settings):
    """openhands-workspace and -sdk at the older version (a trainer not yet upgraded)."""
    from imagefarm.testing.clients import client_python, sdk_at

    return client_python(settings, f"sdk-{OLD}", sdk_at(OLD), log=_log)


@pytest.fixture(scope="module")
def two(settings, registry, fixtures, payload, tmp_path_factory):
    """The same base prebuilt at NEW, then at OLD, by the CLI into one lockfile."""
    from imagefarm.payload import build_payload
    from imagefarm.payload.recipe import recipe_for

    build_payload(settings, recipe_for(settings).at_version(OLD), log=_log)  # minutes once, then cached
    tmp = tmp_path_factory.mktemp("versions")
    to = f"{registry.host}/vers"
    base = fixtures.r2e_base(R2E_REPOS[4], "5" * 40).ref
    dataset = tmp / "ds.jsonl"
    dataset.write_text(json.dumps({"instance_id": "vers-1", "docker_image": base}) + "\n")
    env = {**os.environ, "IMAGEFARM_STATE_DIR": str(settings.state_dir),
           "IMAGEFARM_CACHE_DIR": str(settings.cache_dir), "IMAGEFARM_TO": to,
           "IMAGEFARM_RECIPES_DIR": str(TEST_RECIPES)}
    lock = tmp / "lock.json"
    runs = {}
    for version in (NEW, OLD):
        flag = ["--agent-server-version", version] if version != NEW else []
        p = imagefarm_cli("prebuild", "--dataset", str(dataset), "--lockfile", str(lock), "--json", *flag,
                          env=env, timeout=900)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        runs[version] = Lockfile.read(lock)
    return SimpleNamespace(to=to, base=base, dataset=dataset, lock=lock, env=env, runs=runs,
                           st=settings.model_copy(update={"to": to}),
                           entry={v: runs[OLD].for_instance("vers-1", version=v) for v in (OLD, NEW)})


def test_two_versions_prebuilt_looked_up_and_started(two, sdk_python, sdk_old_python, tmp_path):
    # the second batch added its entry and left the first one's as it was
    assert [e.agent_server_version for e in two.runs[NEW].entries] == [NEW]
    assert sorted(e.key for e in two.runs[OLD].entries) == [("vers-1", "default", OLD), ("vers-1", "default", NEW)]
    assert two.runs[OLD].for_instance("vers-1", version=NEW) == two.runs[NEW].entries[0]
    old, new = two.entry[OLD], two.entry[NEW]
    assert old.verified and new.verified and old.image_digest != new.image_digest
    assert f"-oh{OLD}-" in old.image and f"-oh{NEW}-" in new.image
    listed = json.loads(imagefarm_cli("payload", "list", "--to", two.to, "--json", env=two.env).stdout)
    shown = {(r["agent_server_version"], r["built"], r["pushed"], r["current"]) for r in listed
             if r["recipe_name"] == "default"}
    assert {(OLD, True, True, True), (NEW, True, True, True)} <= shown

    # lookups: each version when asked, the newest verified when not
    lk = Lookup(two.st)
    try:
        assert lk.resolve(two.base, version=OLD).digest == old.image_digest
        assert lk.resolve(two.base, version=NEW).digest == new.image_digest
        assert lk.resolve(two.base).digest == new.image_digest
        got = imagefarm_cli("lookup", "--agent-server-version", OLD, "--json", two.base, env=two.env)
        assert got.returncode == 0 and json.loads(got.stdout)["digest"] == old.image_digest

        cfg = ServeConfig(api_key=KEY, port_range=(38300, 38399), state_dir=tmp_path / "rt")
        with ServerThread(two.st, cfg, resolver=lk) as srv, httpx.Client(headers={"X-API-Key": KEY},
                                                                          timeout=60) as http:
            def start(sid: str, env: dict[str, str]) -> httpx.Response:
                return http.post(f"{srv.url}/start", json={
                    "image": two.base, "command": "/usr/local/bin/openhands-agent-server --port 60000",
                    "session_id": sid, "environment": env})

            bad = start("bad", {"IMAGEFARM_AGENT_SERVER_VERSION": "latest"})
            assert bad.status_code == 422 and "IMAGEFARM_AGENT_SERVER_VERSION" in bad.text
            asked = start("old-asked", {"IMAGEFARM_AGENT_SERVER_VERSION": OLD})
            assert asked.json()["prebuilt_image"] == old.pinned
            http.post(f"{srv.url}/stop", json={"runtime_id": asked.json()["runtime_id"]})
            # the real client of each version runs a command in an image of its own version:
            # the old one asks for its version, the new one asks for none (the newest verified)
            for version, client, ask in ((NEW, sdk_python, ()), (OLD, sdk_old_python, ("--ask-own-version",))):
                proc = client.run(SDK_CLIENT, srv.url, KEY, two.base, "--exec", *ask, timeout=600)
                assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
                steps = {s["step"]: s for s in (json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{"))}
                assert steps["exec"]["exit_code"] == 0 and "from-sdk" in steps["exec"]["stdout"]
                assert steps["server_info"] == {"step": "server_info", "version": version, "sdk": version}
    finally:
        lk.close()


def test_preflight_compares_the_trainer_with_the_images(two, sdk_python, sdk_old_python, tmp_path):
    def preflight(lock: Path, client) -> tuple[int, str]:
        p = imagefarm_cli("launch", "preflight", "--dataset", str(two.dataset), "--lockfile", str(lock),
                          "--trainer-python", " ".join(client.command), env=two.env)
        return p.returncode, " ".join((p.stdout + p.stderr).split())

    for client in (sdk_python, sdk_old_python):  # both versions in the lockfile: each trainer finds its own
        code, text = preflight(two.lock, client)
        assert code == 0, text
    only_old = Lockfile(tuple(e for e in two.runs[OLD].entries if e.agent_server_version == OLD)).write(
        tmp_path / "old.json")
    code, text = preflight(only_old, sdk_old_python)
    assert code == 0 and f"openhands-sdk {OLD}" in text, text
    code, text = preflight(only_old, sdk_python)
    assert code == 1, text
    assert f"openhands-sdk {NEW}" in text and f"openhands-agent-server {OLD}" in text
    assert f"--lockfile {only_old} --agent-server-version {NEW}`" in text  # build at the trainer's version
    assert f"-m pip install openhands-sdk=={OLD} openhands-workspace=={OLD} openhands-agent-server=={OLD}`" in text
    bad = imagefarm_cli("launch", "preflight", "--dataset", str(two.dataset), "--lockfile", str(two.lock),
                        "--trainer-python", "/nonexistent/python", env=two.env)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_verify_reports_server_info_and_refuses_a_mislabelled_payload(two, settings, payload):
    """The 1.58.2 payload labelled as 1.57.0 (what a payload built from the wrong
    version would be): the boot check reads /server_info and fails naming both."""
    import dataclasses

    from imagefarm.derive import Appender, AppendPayload
    from imagefarm.payload.recipe import recipe_for

    liar = dataclasses.replace(AppendPayload.of(payload, recipe_for(settings)), agent_server_version=OLD,
                               recipe_digest=recipe_for(settings).at_version(OLD).digest)
    with Appender(two.st) as appender:
        bad = appender.derive(two.base, liar, to=f"{two.to}-liar")
    p = imagefarm_cli("verify", bad.ref, "--json", env=two.env, timeout=600)
    assert p.returncode == 2, p.stdout + p.stderr
    text = " ".join(p.stderr.split())
    assert f"/server_info says openhands-agent-server {NEW}, but the image's label" in text and f"says {OLD}" in text
    good = imagefarm_cli("verify", two.entry[OLD].pinned, "--json", env=two.env, timeout=600)
    assert good.returncode == 0 and json.loads(good.stdout)["agent_server_version"] == OLD, good.stderr
