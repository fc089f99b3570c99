"""The real-project fixtures (#27): r2e-shaped images of requests at four consecutive
releases, made by buildah from PyPI's sdists and wheels. Read back from the registry
with httpx and GNU tar (nothing of the factory's own code): three layers as Docker
makes them (OS, venv, testbed), written by Go's archive/tar, the testbed a git clone at
the tag's commit, the venv holding that release; a second build builds nothing."""

from __future__ import annotations

import json
import subprocess

import httpx

from imagefarm import oci
from imagefarm.host.projects import SMALL, ProjectImages
from imagefarm.names.reference import parse


def _manifest(registry, ref: str) -> dict:
    r = parse(ref)
    got = httpx.get(f"{registry.url}/v2/{r.repository}/manifests/{r.tag}", headers={"Accept": oci.ACCEPT})
    assert got.status_code == 200, got.text
    return got.json()


def _blob(registry, ref: str, digest: str, path) -> None:
    r = parse(ref)
    with httpx.stream("GET", f"{registry.url}/v2/{r.repository}/blobs/{digest}", follow_redirects=True) as resp:
        assert resp.status_code == 200
        with open(path, "wb") as fh:
            for chunk in resp.iter_bytes():
                fh.write(chunk)


def _tar(*args: str) -> str:
    return subprocess.run(["tar", *args], check=True, capture_output=True, text=True).stdout


def test_real_project_images_are_r2e_shaped_and_made_by_buildah(project_group, registry, settings, tmp_path):
    assert len(project_group) == len(SMALL.releases)
    manifests = [_manifest(registry, img.ref) for img in project_group]
    assert len({m["layers"][0]["digest"] for m in manifests}) == 1  # one OS layer for all
    for img, m, version in zip(project_group, manifests, SMALL.releases):
        ref = parse(img.ref)
        assert ref.repository == "namanjain12/requests_final" and len(ref.tag) == 40
        assert [d["mediaType"] for d in m["layers"]] == [oci.OCI_LAYER_GZIP] * 3
        cfg_path = tmp_path / "config.json"
        _blob(registry, img.ref, m["config"]["digest"], cfg_path)
        cfg = json.loads(cfg_path.read_text())
        made = [h["created_by"] for h in cfg["history"] if not h.get("empty_layer")]
        assert "ADD" in made[0] and "venv --without-pip /testbed/.venv" in made[1] and "COPY" in made[2], made
        assert "VIRTUAL_ENV=/testbed/.venv" in cfg["config"]["Env"] and cfg["config"]["WorkingDir"] == "/testbed"
        venv, testbed = tmp_path / f"venv-{version}.tgz", tmp_path / f"testbed-{version}.tgz"
        _blob(registry, img.ref, m["layers"][1]["digest"], venv)
        _blob(registry, img.ref, m["layers"][2]["digest"], testbed)
        listed = _tar("-tzf", str(venv)).split()
        assert f"testbed/.venv/lib/python3.11/site-packages/requests-{version}.dist-info/" in listed
        # as uv leaves a venv: no pip, no .pyc (their source mtimes would differ per build)
        assert not [n for n in listed if n.endswith(".pyc") or n.startswith("testbed/.venv/bin/pip")]
        # the testbed is a git clone whose HEAD is the commit the tag names
        assert _tar("-xzOf", str(testbed), "testbed/.git/HEAD").strip() == ref.tag
        names = _tar("-tzf", str(testbed)).split()
        assert "testbed/run_tests.sh" in names and any(n.startswith("testbed/.git/objects/pack/") for n in names)
        # Go's archive/tar (what buildah, podman and Docker write): a directory's header
        # carries the file-type bits (040000) in its mode field; Python's tarfile does not
        raw = subprocess.run(["gzip", "-dc", str(venv)], check=True, capture_output=True).stdout
        modes = {raw[off + 100:off + 108] for off in _headers(raw)}
        assert any(m.lstrip(b"0").startswith(b"40") for m in modes), sorted(modes)[:5]

    # the same inputs again: nothing is built, the same digests are pushed
    built = []
    with ProjectImages(settings, registry.host, log=built.append) as p:
        again = p.push(SMALL)
    assert [i.digest for i in again] == [i.digest for i in project_group]
    assert not [m for m in built if " built in " in m], built


def _headers(raw: bytes):
    """Offsets of the tar headers in an uncompressed archive (walked by their sizes)."""
    off = 0
    while off + 512 <= len(raw) and raw[off:off + 512].strip(b"\0"):
        yield off
        size = int(raw[off + 124:off + 136].strip(b"\0 ") or b"0", 8)
        off += 512 + -(-size // 512) * 512
