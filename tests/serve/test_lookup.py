"""Lookup against the real fixture registry: hits, misses, batch, bad input, cache."""

import json
import threading

import httpx
import pytest
import uvicorn

from imagefarm.farm import attest
from imagefarm.errors import InvalidReference
from imagefarm.farm.lockfile import Entry, Lockfile
from imagefarm.serve.lookup import Lookup
from imagefarm.serve.lookup_api import create_app
from imagefarm.names.reference import parse
from imagefarm.settings import Settings
from imagefarm.host.services import free_port
from tests.conftest import imagefarm_cli


@pytest.fixture
def to(registry, request):
    return f"{registry.host}/lk-{request.node.name[:20].lower().replace('_', '-')}"


def make_lookup(settings, to, **kw):
    return Lookup(Settings(**{**settings.model_dump(), "to": to}), **kw)


def test_hit_miss_and_invalidation(settings, fixtures, derive_to, to):
    base = fixtures.r2e_base("namanjain12/numpy_final", "1" * 40).ref
    lk = make_lookup(settings, to, ttl=300, miss_ttl=0)
    assert lk.resolve(base) is None  # not built yet
    result = derive_to(base, to)
    hit = lk.resolve(base)  # a miss is never cached: the new image is found at once
    assert hit is not None
    assert hit.digest == result.digest and hit.image == result.image
    assert hit.base == base and hit.base_digest == result.base_digest
    assert hit.pinned == f"{parse(result.image).name}@{result.digest}"
    assert not hit.verified
    # the same answer for the same base written differently and for the derived ref
    assert lk.resolve(json.dumps({"data_source": "r2e-gym", "instance": {"instance_id": base}})).digest == hit.digest
    assert lk.resolve(result.image).digest == hit.digest
    # a verification record appears: after invalidation the answer says verified
    attest.record(lk.client, parse(result.image), result.digest, {"alive": True})
    assert not lk.resolve(base).verified  # cached hit
    lk.invalidate(base)
    assert lk.resolve(base).verified
    lk.close()


def test_bad_input(settings, to):
    lk = make_lookup(settings, to)
    for bad in ("", "Upper/Case:1", "x@sha256:123", "a b"):
        with pytest.raises(InvalidReference):
            lk.resolve(bad)
    lk.close()


def test_lockfile_answers_without_registry(settings, tmp_path, to):
    lk0 = make_lookup(settings, to)
    rec = lk0.recipe
    lk0.close()
    e = Entry("i1", "train", "docker.io/namanjain12/pandas_final:abc", "sha256:" + "1" * 64,
              "unreachable.invalid/x/namanjain12/pandas_final:abc-oh1", "sha256:" + "2" * 64,
              rec.name, rec.digest, rec.agent_server_version, True)
    path = Lockfile((e,)).write(tmp_path / "lock.json")
    lk = make_lookup(settings, to, lockfile=path)
    hit = lk.resolve("namanjain12/pandas_final:abc")
    assert hit.source == "lockfile" and hit.digest == "sha256:" + "2" * 64 and hit.verified
    lk.close()


@pytest.fixture
def api(settings, to):
    lk = make_lookup(settings, to, miss_ttl=0)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(lk, api_key="k3y"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        t.join(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(10)
    lk.close()


def test_http_api(api, fixtures, derive_to, to):
    h = {"X-API-Key": "k3y"}
    base = fixtures.r2e_base("namanjain12/aiohttp_final", "2" * 40).ref
    other = fixtures.r2e_base("namanjain12/aiohttp_final", "3" * 40).ref
    assert httpx.get(f"{api}/v1/lookup", params={"image": base}).status_code == 401
    assert httpx.get(f"{api}/v1/lookup", params={"image": base}, headers={"X-API-Key": "nope"}).status_code == 401
    r = httpx.get(f"{api}/v1/lookup", params={"image": base}, headers=h)
    assert r.status_code == 404 and r.json()["build"] == f"imagefarm derive {base} --to {to}"
    derive_to(base, to)
    r = httpx.get(f"{api}/v1/lookup", params={"image": base}, headers=h)
    assert r.status_code == 200 and r.json()["pinned"].startswith(f"{to}/namanjain12/aiohttp_final@sha256:")
    r = httpx.get(f"{api}/v1/lookup", params={"image": "Bad Ref"}, headers=h)
    assert r.status_code == 400 and "whitespace" in r.json()["detail"]
    batch = [base, other, "x@sha256:12", {"instance": {"instance_id": base}}] + [base] * 500
    r = httpx.post(f"{api}/v1/lookup", json={"images": batch}, headers=h, timeout=60)
    body = r.json()
    assert r.status_code == 200
    assert set(body["found"]) == {base} and set(body["missing"]) == {other} and "x@sha256:12" in body["invalid"]
    assert httpx.post(f"{api}/v1/lookup", json={"images": "nope"}, headers=h).status_code == 422
    assert httpx.get(f"{api}/healthz").json()["status"] == "ok"
    assert "imagefarm_lookup_requests_total" in httpx.get(f"{api}/metrics").text
    assert httpx.get(f"{api}/openapi.json").json()["info"]["title"] == "imagefarm lookup"


def test_cli(cli_env, fixtures, derive_to, registry):
    to = f"{registry.host}/lk-cli"
    base = fixtures.r2e_base("namanjain12/tornado_final", "4" * 40).ref
    env = {**cli_env, "IMAGEFARM_TO": to}
    miss = imagefarm_cli("lookup", base, env=env)
    assert miss.returncode == 1 and f"imagefarm derive {base} --to {to}" in miss.stderr
    result = derive_to(base, to)
    hit = imagefarm_cli("lookup", base, "--json", env=env)
    assert hit.returncode == 0, hit.stderr
    assert json.loads(hit.stdout)["digest"] == result.digest
    bad = imagefarm_cli("lookup", "NOT VALID", env=env)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def test_schemathesis_finds_no_server_error(api, tmp_path):
    """Property-based requests from the served OpenAPI document: never a 5xx."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    proc = subprocess.run([exe, "run", f"{api}/openapi.json", "--checks", "not_a_server_error",
                           "--max-examples", "40", "-H", "X-API-Key: k3y", "--phases", "examples,coverage,fuzzing"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    import re

    m = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
    assert m and int(m.group(1)) > 50 and m.group(1) == m.group(2), proc.stdout[-2000:]
    assert "Tested: 4" in proc.stdout
