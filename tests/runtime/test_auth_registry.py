"""Derive, prebuild and a runtime start against a registry that requires htpasswd basic
auth (the ``auth_registry`` fixture: user farm, password s3cret), with the credentials in
the auth file IMAGEFARM_AUTH_FILE names: imagefarm's client and podman both use it."""

from __future__ import annotations

import base64
import json
import os

import httpx
import pytest

from imagefarm.errors import AuthError
from imagefarm.farm.lockfile import Lockfile
from imagefarm.host.samples import FixtureFactory
from tests.conftest import imagefarm_cli

from rtkit import API_KEY, our_containers, sdk_start_body, wait_pod_status

pytestmark = pytest.mark.timeout(1200)


def test_derive_prebuild_and_runtime_start_with_basic_auth(settings, auth_registry, payload, tmp_path):
    from imagefarm.derive import derive
    from imagefarm.serve.lookup import Lookup
    from imagefarm.runtime import ServeConfig
    from imagefarm.runtime.serve import ServerThread

    host = auth_registry.host
    to = f"{host}/prebuilt"
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(b"farm:s3cret").decode()}}}))
    os.chmod(auth, 0o600)
    st = settings.model_copy(update={"to": to, "auth_file": auth})
    assert httpx.get(f"{auth_registry.url}/v2/", timeout=30).status_code == 401  # the registry insists
    with FixtureFactory(st, host) as f:  # skopeo pushes with the same auth file
        one = f.r2e_base("namanjain12/authone_final", "a" * 40).ref
        two = f.r2e_base("namanjain12/authtwo_final", "b" * 40).ref
    # without the credentials: a clear error naming the fix, nothing pushed
    anon = settings.model_copy(update={"to": to, "auth_file": tmp_path / "none.json"})
    (tmp_path / "none.json").write_text('{"auths": {}}')
    with pytest.raises(AuthError, match="podman login"):
        derive(one, payload, anon)

    env = dict(os.environ, IMAGEFARM_STATE_DIR=str(settings.state_dir), IMAGEFARM_CACHE_DIR=str(settings.cache_dir),
               IMAGEFARM_TO=to, IMAGEFARM_AUTH_FILE=str(auth))
    d = imagefarm_cli("derive", one, "--json", env=env, timeout=600)
    assert d.returncode == 0, d.stderr[-3000:]
    derived = json.loads(d.stdout)
    assert derived["image"].startswith(f"{to}/namanjain12/authone_final:")

    dataset = tmp_path / "auth.jsonl"
    dataset.write_text(json.dumps({"docker_image": two}) + "\n")
    lockfile = tmp_path / "lock.json"
    p = imagefarm_cli("prebuild", "--dataset", str(dataset), "--executor", "local", "--verify", "all",
                      "--lockfile", str(lockfile), "--json", env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    state = json.loads(p.stdout)
    assert state["derived"] == 1 and state["verified"] == 1 and state["failed"] == 0, state
    entry = Lockfile.read(lockfile).entries[0]
    assert entry.verified and entry.image.startswith(f"{to}/namanjain12/authtwo_final:")

    # the runtime server: the lookup reads the registry with the credentials, podman pulls with them
    lk = Lookup(st)
    cfg = ServeConfig(api_key=API_KEY, port_range=(43100, 43199), state_dir=tmp_path / "rt")
    try:
        with ServerThread(st, cfg, resolver=lk) as srv, httpx.Client(headers={"X-API-Key": API_KEY},
                                                                     timeout=60) as c:
            sid = "auth-" + os.urandom(4).hex()
            r = c.post(f"{srv.url}/start", json=sdk_start_body(two, sid))
            assert r.status_code == 200, r.text
            assert r.json()["prebuilt_image"] == entry.pinned
            ready = wait_pod_status(c, f"{srv.url}/sessions/{sid}", timeout=180)
            assert httpx.get(f"{ready['url']}/alive", timeout=10).status_code == 200  # the real agent server
            assert c.post(f"{srv.url}/stop", json={"runtime_id": ready["runtime_id"]}).status_code == 200
            assert our_containers(st, srv.manager.server_id) == []
    finally:
        lk.close()
