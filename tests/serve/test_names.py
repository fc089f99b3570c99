"""Names stay the dataset's: an image derived through a mirror (a pull-through cache,
distribution's ``proxy: remoteurl:``) is found by the name the dataset and the trainer
use, and by the same repository and tag under another address; the mirror is recorded
apart. The "public" registry is an unreachable loopback address (127.0.0.9:5999): only
the mirror, whose remote is the session registry, is ever read."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from imagefarm import oci
from imagefarm.derive import Appender
from imagefarm.serve.lookup import Lookup
from imagefarm.names.reference import parse
from imagefarm.settings import Settings
from imagefarm.host.services import Registry, free_port
from tests.conftest import imagefarm_cli

PUBLIC = "127.0.0.9:5999"


@pytest.fixture(scope="module")
def mirror(registry, tmp_path_factory):
    with Registry(workdir=tmp_path_factory.mktemp("mirror"), proxy=registry.url) as m:
        yield m


def _lookup(settings, to):
    return Lookup(Settings(**{**settings.model_dump(), "to": to}), miss_ttl=0)


def test_derived_through_a_mirror_found_by_the_dataset_name(settings, fixtures, registry, mirror, small_payload):
    base = fixtures.r2e_base("namanjain12/tornado_final", "7" * 40)
    path = base.ref.split("/", 1)[1]                  # namanjain12/tornado_final:777...
    dataset_name = f"{PUBLIC}/{path}"
    to = f"{registry.host}/names-mirror"
    through = Settings(**{**settings.model_dump(), "to": to, "mirrors": {PUBLIC: mirror.host}})
    with Appender(through) as ap:
        result = ap.derive(dataset_name, small_payload)
        m = ap.client.get_manifest(parse(result.image))
    ann = m.annotations
    assert ann[oci.ANN_BASE_NAME] == dataset_name     # the name as the dataset gives it
    assert ann[oci.ANN_BASE_SOURCE] == f"{mirror.host}/{path}"  # where the bytes came from
    assert result.base == dataset_name
    # the mirror holds the base's layers now: it fetched them from its remote
    blobs = mirror.workdir / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256"
    layer = m.layers[0].digest.split(":")[1]
    assert (blobs / layer[:2] / layer / "data").is_file()

    lk = _lookup(settings, to)
    for query in (dataset_name, f"{mirror.host}/{path}", f"127.0.0.1:{free_port()}/{path}",
                  f"{dataset_name}@{result.base_digest}",
                  json.dumps({"data_source": "r2e-gym", "instance": {"instance_id": dataset_name}})):
        hit = lk.resolve(query)
        assert hit is not None and hit.digest == result.digest, query
        assert hit.base == dataset_name
    assert lk.resolve(f"{dataset_name}@sha256:{'0' * 64}") is None  # name plus digest: the digest decides
    assert lk.resolve(f"{PUBLIC}/namanjain12/tornado_final:{'8' * 40}") is None
    lk.close()


def test_found_under_another_address_of_the_registry(settings, fixtures, registry, derive_to):
    """The issue's case: derived from 127.0.0.1:PORT/..., asked as 127.0.0.9:5999/..."""
    base = fixtures.r2e_base("namanjain12/tornado_final", "9" * 40)
    to = f"{registry.host}/names-addr"
    result = derive_to(base.ref, to)
    lk = _lookup(settings, to)
    path = base.ref.split("/", 1)[1]
    hit = lk.resolve(f"{PUBLIC}/{path}")
    assert hit is not None and hit.digest == result.digest and hit.base == base.ref
    assert lk.resolve(f"namanjain12/{path.split('/', 1)[1]}").digest == result.digest  # the short name
    lk.close()


def test_dev_up_mirror_is_a_pull_through_cache(fixtures, registry, tmp_path):
    base = fixtures.r2e_base("namanjain12/tornado_final", "7" * 40)
    path = base.ref.split("/", 1)[1]
    repo, tag = path.rsplit(":", 1)
    port, mport, rport = free_port(), free_port(), free_port()
    env = {**os.environ, "IMAGEFARM_STATE_DIR": str(tmp_path / "state"),
           "IMAGEFARM_TO": f"127.0.0.1:{port}/prebuilt", "IMAGEFARM_BROKER_URL": f"redis://127.0.0.1:{rport}/0"}
    up = imagefarm_cli("dev", "up", "--cache-registry", registry.host, "--cache-port", str(mport), env=env, timeout=120)
    try:
        assert up.returncode == 0, up.stderr
        assert f"IMAGEFARM_MIRRORS='{{\"{registry.host}\": \"127.0.0.1:{mport}\"}}'" in up.stdout
        r = httpx.get(f"http://127.0.0.1:{mport}/v2/{repo}/manifests/{tag}", headers={"Accept": oci.ACCEPT})
        assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == base.digest
        # read-only, as distribution's proxy mode is: the team's images go to the registry
        assert httpx.post(f"http://127.0.0.1:{mport}/v2/{repo}/blobs/uploads/").status_code >= 400
    finally:
        down = imagefarm_cli("dev", "down", env=env, timeout=60)
    assert "mirror" in down.stdout
    bad = imagefarm_cli("dev", "up", "--mirror", "Not A Registry", env=env, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
