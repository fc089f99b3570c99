"""Manifest parsing and platform selection (no registry needed)."""

from __future__ import annotations

import json

import pytest

from imagefarm import oci
from imagefarm.errors import UnsupportedMedia
from imagefarm.registry.manifests import MANIFEST_LIMIT, Index, Manifest, parse_manifest as parse, select_platform

LAYER = {"mediaType": oci.DOCKER_LAYER_GZIP, "digest": "sha256:" + "1" * 64, "size": 10}
CONFIG = {"mediaType": oci.DOCKER_CONFIG, "digest": "sha256:" + "2" * 64, "size": 5}


def raw(doc) -> bytes:
    return json.dumps(doc).encode()


def test_docker_v2_manifest():
    m = parse(raw({"schemaVersion": 2, "mediaType": oci.DOCKER_MANIFEST, "config": CONFIG, "layers": [LAYER]}))
    assert isinstance(m, Manifest) and m.is_docker and m.layers[0].digest == LAYER["digest"]
    assert m.digest == oci.sha256_digest(m.raw)


def test_oci_manifest_without_media_type_field():
    doc = {"schemaVersion": 2, "config": {**CONFIG, "mediaType": oci.OCI_CONFIG}, "layers": [LAYER],
           "annotations": {"a": "b"}}
    m = parse(raw(doc), "application/vnd.oci.image.manifest.v1+json; charset=utf-8")
    assert m.media_type == oci.OCI_MANIFEST and m.annotations["a"] == "b"


def test_schema1_refused_with_fix():
    with pytest.raises(UnsupportedMedia, match="schema 1.*skopeo copy --format v2s2"):
        parse(raw({"schemaVersion": 1, "name": "x", "fsLayers": []}))


@pytest.mark.parametrize("doc,match", [
    ({"schemaVersion": 2, "config": {**CONFIG, "mediaType": "application/vnd.cncf.helm.config.v1+json"},
      "layers": []}, "artifact"),
    ({"schemaVersion": 2, "config": CONFIG, "layers": [{**LAYER, "mediaType": "application/x-foo"}]}, "x-foo"),
    ({"schemaVersion": 2, "mediaType": "application/json", "config": CONFIG}, "not an image manifest"),
    ({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST}, "malformed"),
])
def test_not_images(doc, match):
    with pytest.raises(UnsupportedMedia, match=match):
        parse(raw(doc))


def test_too_big_and_not_json():
    with pytest.raises(UnsupportedMedia, match="limit"):
        parse(b" " * (MANIFEST_LIMIT + 1))
    with pytest.raises(UnsupportedMedia, match="not JSON"):
        parse(b"<html>")


def test_foreign_layers_are_flagged():
    m = parse(raw({"schemaVersion": 2, "mediaType": oci.DOCKER_MANIFEST, "config": CONFIG,
                   "layers": [{**LAYER, "mediaType": oci.DOCKER_FOREIGN_LAYER}]}))
    assert len(m.foreign_layers) == 1


def test_platform_selection():
    entries = [
        {"mediaType": oci.OCI_MANIFEST, "digest": "sha256:" + "a" * 64, "size": 1,
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": oci.OCI_MANIFEST, "digest": "sha256:" + "b" * 64, "size": 1,
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": oci.OCI_MANIFEST, "digest": "sha256:" + "c" * 64, "size": 1,
         "platform": {"os": "unknown", "architecture": "unknown"}},  # attestation
    ]
    idx = parse(raw({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": entries}))
    assert isinstance(idx, Index)
    assert select_platform(idx, "linux/amd64").digest.endswith("b" * 64)
    assert select_platform(idx, "linux/arm64/v8").digest.endswith("a" * 64)
    with pytest.raises(UnsupportedMedia, match=r"linux/arm/v7.*linux/arm64/v8, linux/amd64"):
        select_platform(idx, "linux/arm/v7")
