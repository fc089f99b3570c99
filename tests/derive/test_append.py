"""The fast derive path against real registries, checked with skopeo and podman."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from imagefarm import oci
from imagefarm.host.containers import run
from imagefarm.derive import Appender
from imagefarm.errors import DeriveError, InvalidReference, NotFound, UnsupportedMedia
from imagefarm.names.reference import parse
from imagefarm.registry import RegistryClient
from derivekit import BASE_ENV, RECIPE_DIGEST, file_layer, push_base, skopeo_json, synthetic_payload

HEX = "0123456789abcdef" * 3


def commit(i: int) -> str:
    return (f"{i:04x}" + HEX)[:40]


@pytest.fixture(scope="module")
def base(dreg, dwork, bb_layer):
    """One busybox base with a /testbed file, in the target registry."""
    ref = f"{dreg.host}/namanjain12/pandas_final:{commit(1)}"
    push_base(dwork / "b1", ref, [bb_layer, file_layer(dwork / "blobs", "x", "from the base\n")])
    return ref


def test_derived_manifest_and_config(appender, base, payload):
    r = appender.derive(base, payload)
    assert not r.skipped and r.image.startswith(f"{appender.settings.to}/namanjain12/pandas_final:{commit(1)}-oh1.58.2-")
    raw_base = skopeo_json(base, "--raw")
    raw = skopeo_json(r.image, "--raw")
    assert raw["mediaType"] == oci.OCI_MANIFEST
    assert [d["digest"] for d in raw["layers"]] == [d["digest"] for d in raw_base["layers"]] + [payload.layer.digest]
    ann = raw["annotations"]
    assert ann[oci.ANN_BASE_NAME] == base
    assert ann[oci.ANN_BASE_DIGEST] == r.base_digest == skopeo_json(base)["Digest"]
    assert ann[oci.ANN_RECIPE] == "default" and ann[oci.ANN_RECIPE_DIGEST] == RECIPE_DIGEST
    assert ann[oci.ANN_AGENT_VERSION] == "1.58.2" and ann[oci.ANN_PAYLOAD_DIGEST] == payload.layer.digest
    base_cfg, cfg = skopeo_json(base, "--config"), skopeo_json(r.image, "--config")
    assert cfg["rootfs"]["diff_ids"] == base_cfg["rootfs"]["diff_ids"] + [payload.layer.diff_id]
    assert cfg["history"][:-1] == base_cfg["history"]
    assert cfg["history"][-1]["created"] == oci.EPOCH_ISO and "1.58.2" in cfg["history"][-1]["created_by"]
    assert cfg["config"]["Env"] == BASE_ENV + ["LITELLM_LOCAL_MODEL_COST_MAP=True"]
    for key in ("WorkingDir", "User", "Cmd"):
        assert cfg["config"][key] == base_cfg["config"][key]
    assert cfg["created"] == base_cfg["created"]
    assert r.digest == skopeo_json(r.image)["Digest"]


def test_twice_is_identical_and_skipped(dsettings, appender, base, payload, dreg):
    first = appender.derive(base, payload)
    again = appender.derive(base, payload)
    assert again.skipped and again.digest == first.digest
    assert again.blobs_uploaded == 0 and again.bytes_moved == 0 and again.requests == 2
    # a new process (fresh client and caches) also just skips
    with Appender(dsettings, RegistryClient(dsettings, credentials={})) as fresh:
        r = fresh.derive(base, payload)
        assert r.skipped and r.digest == first.digest
        # the same derive under another prefix is the same manifest, byte for byte
        other = fresh.derive(base, payload, to=f"{dreg.host}/elsewhere")
    assert not other.skipped and other.digest == first.digest
    raw = lambda ref: subprocess.run(  # noqa: E731
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        check=True, capture_output=True).stdout
    assert raw(other.image) == raw(first.image)


def test_new_recipe_is_a_new_tag(appender, base, payload, dwork):
    bumped = synthetic_payload(dwork / "payload", version="1.59.0", digest="sha256:" + "6" * 64)
    a, b = appender.derive(base, payload), appender.derive(base, bumped)
    assert a.image != b.image and "-oh1.59.0-" in b.image and a.digest != b.digest


def test_podman_sees_base_files_and_payload(dsettings, appender, base, payload):
    r = appender.derive(base, payload)
    out = run(dsettings, ["podman", "run", "--rm", "--tls-verify=false", r.ref, "sh", "-c",
                          "cat /testbed/x; /usr/local/bin/openhands-agent-server --port 60000; "
                          "echo $LITELLM_LOCAL_MODEL_COST_MAP; pwd; id -u"], timeout=300).stdout
    assert out.split("\n")[:5] == ["from the base", "openhands-agent-server stand-in --port 60000",
                                   "True", "/testbed", "1000"]


def test_cross_registry_copies_each_blob_once(dsettings, dreg, dreg2, dwork, bb_layer, payload):
    """Two bases in another registry share the busybox layer: it crosses over once."""
    blobs = dwork / "blobs"
    uniq = [file_layer(blobs, "u", f"unique {i}\n") for i in range(2)]
    bases = [f"{dreg2.host}/namanjain12/{name}:{commit(7)}" for name in ("numpy_final", "aiohttp_final")]
    for i, ref in enumerate(bases):
        push_base(dwork / f"x{i}", ref, [bb_layer, uniq[i]])
    to = f"{dreg.host}/copied"
    with Appender(dsettings, RegistryClient(dsettings, credentials={})) as a:
        r1, r2 = (a.derive(ref, payload, to=to) for ref in bases)
        total = a.client.stats.total
    cfg_sizes = [skopeo_json(r.image, "--raw")["config"]["size"] for r in (r1, r2)]
    # first: busybox + unique + payload + config; second: its unique layer + config only
    assert (r1.blobs_uploaded, r2.blobs_uploaded) == (4, 2)
    assert r1.bytes_moved == bb_layer.size + uniq[0].size + payload.layer.size + cfg_sizes[0]
    assert r2.bytes_moved == uniq[1].size + cfg_sizes[1]
    assert total.blobs_mounted >= 2  # busybox into the second repo, payload from its home
    for r in (r1, r2):
        assert len(skopeo_json(r.image, "--raw")["layers"]) == 3


def test_docker_v2_base_becomes_oci(appender, dreg, dwork, bb_layer, payload):
    ref = f"{dreg.host}/namanjain12/tornado_final:{commit(3)}"
    push_base(dwork / "v2", ref, [bb_layer, file_layer(dwork / "blobs", "x", "v2\n")], fmt="v2s2")
    assert skopeo_json(ref, "--raw")["mediaType"] == oci.DOCKER_MANIFEST
    r = appender.derive(ref, payload)
    raw = skopeo_json(r.image, "--raw")
    assert raw["mediaType"] == oci.OCI_MANIFEST and raw["config"]["mediaType"] == oci.OCI_CONFIG
    assert {d["mediaType"] for d in raw["layers"]} == {oci.OCI_LAYER_GZIP}


def test_index_base_resolves_to_amd64(appender, dreg, dwork, bb_layer, payload):
    ref = parse(f"{dreg.host}/namanjain12/pillow_final:{commit(4)}")
    push_base(dwork / "ix", str(ref.with_tag("amd")), [bb_layer, file_layer(dwork / "blobs", "x", "amd\n")])
    c = appender.client
    amd = c.head_manifest(ref.with_tag("amd"))
    index = oci.canonical_json({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [
        {"mediaType": oci.OCI_MANIFEST, "digest": amd.digest, "size": amd.size,
         "platform": {"os": "linux", "architecture": "amd64"}}]})
    c.put_manifest(ref, index, oci.OCI_INDEX)
    r = appender.derive(str(ref), payload)
    assert r.base_digest == amd.digest
    assert skopeo_json(r.image, "--raw")["annotations"][oci.ANN_BASE_DIGEST] == amd.digest


def test_concurrent_derives_share_one_appender(appender, dreg, dwork, bb_layer, payload):
    refs = [f"{dreg.host}/namanjain12/pandas_final:{commit(100 + i)}" for i in range(6)]
    for i, ref in enumerate(refs):
        push_base(dwork / f"c{i}", ref, [bb_layer, file_layer(dwork / "blobs", "x", f"c{i}\n")])
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda ref: appender.derive(ref, payload, to=f"{dreg.host}/conc"), refs))
    assert len({r.digest for r in results}) == 6
    assert sum(r.blobs_uploaded for r in results) == 6 + 1  # a config each, the payload once
    assert all(len(skopeo_json(r.image, "--raw")["layers"]) == 3 for r in results)


# -- refusals -----------------------------------------------------------------------------
def test_base_not_found_names_it(appender, dreg, payload):
    ref = f"{dreg.host}/namanjain12/pandas_final:{'f' * 40}"
    with pytest.raises(NotFound) as e:
        appender.derive(ref, payload)
    assert ref in str(e.value) and "MANIFEST_UNKNOWN" in str(e.value)


@pytest.mark.parametrize("bad", ["", "Namanjain12/Pandas:1", "pandas:bad tag", "repo@sha256:abc", "a/b:" + "x" * 200])
def test_malformed_reference(appender, payload, bad):
    with pytest.raises(InvalidReference):
        appender.derive(bad, payload)


def test_too_many_layers_refused(appender, dreg, dwork, payload):
    c = appender.client
    ref = parse(f"{dreg.host}/namanjain12/deep_final:{commit(5)}")
    layers = [file_layer(dwork / "blobs", "d", f"{i}\n") for i in range(127)]
    for layer in layers:
        c.upload_blob(ref, layer.digest, layer.path)
    cfg = oci.canonical_json(oci.image_config(layers))
    c.upload_blob(ref, oci.sha256_digest(cfg), cfg)
    c.put_manifest(ref, oci.canonical_json(oci.image_manifest(cfg, layers)), oci.OCI_MANIFEST)
    with pytest.raises(DeriveError, match="127 layers.*overlayfs.*squash"):
        appender.derive(str(ref), payload)


def test_artifact_base_refused(appender, dreg, dwork, payload):
    c = appender.client
    ref = parse(f"{dreg.host}/namanjain12/sbom_final:{commit(6)}")
    blob = json.dumps({"spdxVersion": "SPDX-2.3"}).encode()
    empty = b"{}"
    for data in (blob, empty):
        c.upload_blob(ref, oci.sha256_digest(data), data)
    doc = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "artifactType": "application/spdx+json",
           "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": oci.sha256_digest(empty), "size": 2},
           "layers": [{"mediaType": "application/spdx+json", "digest": oci.sha256_digest(blob), "size": len(blob)}]}
    c.put_manifest(ref, oci.canonical_json(doc), oci.OCI_MANIFEST)
    with pytest.raises(UnsupportedMedia, match="OCI artifact .*spdx.*not a container image"):
        appender.derive(str(ref), payload)


def test_foreign_architecture_refused(appender, dreg, dwork, payload):
    c = appender.client
    ref = parse(f"{dreg.host}/namanjain12/arm_final:{commit(8)}")
    layer = file_layer(dwork / "blobs", "a", "arm\n")
    c.upload_blob(ref, layer.digest, layer.path)
    cfg = oci.canonical_json(oci.image_config([layer], architecture="arm64"))
    c.upload_blob(ref, oci.sha256_digest(cfg), cfg)
    c.put_manifest(ref, oci.canonical_json(oci.image_manifest(cfg, [layer])), oci.OCI_MANIFEST)
    with pytest.raises(DeriveError, match="linux/arm64 image.*linux/amd64"):
        appender.derive(str(ref), payload)
