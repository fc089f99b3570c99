"""What derive publishes is signed, and a payload it reads is checked before it is used.

A payload image re-pushed under its tag with another layer (annotations made to match)
is refused by a derive with an empty cache, one line naming it; the genuine one,
fetched the same way, works and its image carries signed provenance."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagefarm import oci
from imagefarm.derive import AppendPayload, provenance
from imagefarm.errors import SignatureError
from imagefarm.names.reference import parse
from imagefarm.payload.recipe import load_recipe
from imagefarm.payload.remote import SIG_KIND, artifact_ref, find, push
from imagefarm.registry import RegistryClient
from imagefarm.host.services import Registry
from imagefarm.sign import artifacts
from derivekit import file_layer, push_base, synthetic_payload

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).parent / "imagefarm")
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=300)


def _forge(c: RegistryClient, ref, genuine_digest: str, blobs: Path) -> str:
    """Re-push ``ref`` with another layer, its annotations copied (the payload digest one
    made to match the new layer, as anyone with push rights could); returns its digest."""
    m = c.get_manifest(ref.with_digest(genuine_digest))
    evil = oci.write_layer([oci.dir_entry("usr"), oci.dir_entry("usr/local"), oci.dir_entry("usr/local/bin"),
                            oci.file_entry("usr/local/bin/openhands-agent-server", b"#!/bin/sh\necho evil\n", 0o755)],
                           blobs)
    home = parse(ref.name)
    c.upload_blob(home, evil.digest, evil.path, size=evil.size)
    cfg = json.loads(c.get_blob_bytes(ref, m.config.digest))
    cfg["rootfs"]["diff_ids"] = [evil.diff_id]
    cfg_raw = oci.canonical_json(cfg)
    c.upload_blob(home, oci.sha256_digest(cfg_raw), cfg_raw)
    doc = json.loads(m.raw)
    doc["config"] = {"mediaType": oci.OCI_CONFIG, "digest": oci.sha256_digest(cfg_raw), "size": len(cfg_raw)}
    doc["layers"] = [evil.descriptor.to_json()]
    doc["annotations"][oci.ANN_PAYLOAD_DIGEST] = evil.digest
    return c.put_manifest(ref, oci.canonical_json(doc), oci.OCI_MANIFEST)


def test_a_repushed_payload_is_refused_and_the_genuine_one_works(dsettings, dreg, dwork, bb_layer, tmp_path):
    recipe = load_recipe("default", REPO / "recipes")
    base = f"{dreg.host}/namanjain12/pandas_final:{'e' * 40}"
    push_base(dwork / "signed", base, [bb_layer, file_layer(dwork / "blobs", "s", "signed\n")])
    stand_in = synthetic_payload(dwork / "signed-payload").layer
    genuine = AppendPayload(stand_in, recipe.name, recipe.digest, recipe.agent_server_version, tuple(recipe.env))
    prefix = f"{dreg.host}/signed"
    env = {**os.environ, "IMAGEFARM_STATE_DIR": str(dsettings.state_dir),
           "IMAGEFARM_CACHE_DIR": str(tmp_path / "empty-cache"), "IMAGEFARM_RECIPES_DIR": str(REPO / "recipes")}
    with RegistryClient(dsettings) as c:
        ref, digest, _ = push(c, genuine, prefix)
        # the genuine one, found in --to by a derive whose cache is empty: used, and the
        # image it makes has signed provenance naming base, payload and recipe
        p = cli("derive", base, "--to", prefix, "--json", env=env)
        assert p.returncode == 0, p.stderr
        made = json.loads(p.stdout)
        prov = provenance.read(c, parse(made["image"]), made["digest"])
        assert prov["payload_digest"] == stand_in.digest and prov["base_digest"] == made["base_digest"]
        assert prov["how"] == "append" and prov["recipe_digest"] == recipe.digest

        forged = _forge(c, ref, digest, tmp_path / "evil")
        assert forged != digest
        p = cli("derive", f"{dreg.host}/namanjain12/pandas_final:{'e' * 40}", "--to", prefix, "--json",
                "--agent-server-version", recipe.agent_server_version, env={**env, "IMAGEFARM_TO": prefix})
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert f"payload image {ref}" in p.stderr and "not signed" in p.stderr, p.stderr
        assert "building" not in p.stderr  # an error, never a miss that falls back to a build
        # the genuine signature moved onto the forged digest: signed for another subject
        sig = c.get_raw_manifest(ref.with_digest(digest).__class__(ref.registry, ref.repository,
                                                                   artifacts.tag_for(digest, SIG_KIND)))[0]
        doc = json.loads(sig)
        doc["subject"]["digest"] = forged
        c.put_manifest(ref.__class__(ref.registry, ref.repository, artifacts.tag_for(forged, SIG_KIND)),
                       oci.canonical_json(doc), oci.OCI_MANIFEST)
        with pytest.raises(SignatureError, match="another subject"):
            find(c, recipe, prefix)

        # the genuine one back under the tag, fetched the same way: works again
        m = c.get_manifest(ref.with_digest(digest))
        c.put_manifest(ref, m.raw, m.media_type)
        p = cli("derive", base, "--to", prefix, "--json", env=env)
        assert p.returncode == 0, p.stderr


def test_a_second_push_writes_nothing_and_an_unsigned_provenance_is_refused(dsettings, dwork, tmp_path):
    recipe = load_recipe("default", REPO / "recipes")
    stand_in = synthetic_payload(dwork / "idem-payload").layer
    p = AppendPayload(stand_in, recipe.name, recipe.digest, recipe.agent_server_version, tuple(recipe.env))
    with Registry.create(tmp_path / "reg", access_log=True) as reg, RegistryClient(dsettings) as c:
        prefix = f"{reg.host}/idem"
        push(c, p, prefix)
        mark = reg.mark()
        push(c, p, prefix)
        seen = reg.accesses(mark)
        writes = [f"{a.method} {a.path}" for a in seen if a.method in ("PUT", "POST", "PATCH", "DELETE")]
        assert seen and writes == [], writes  # the second push read (HEAD/GET) and wrote nothing
        # an unsigned artifact at a provenance tag is refused, naming what and why
        ref = artifact_ref(prefix, recipe.digest)
        m = c.get_manifest(ref)
        raw = artifacts.manifest_for({"payloadType": "x", "payload": base64.b64encode(b"{}").decode(),
                                      "signatures": []}, provenance.ARTIFACT_TYPE,
                                     oci.Descriptor(oci.OCI_MANIFEST, m.digest, len(m.raw)))
        c.put_manifest(ref.__class__(ref.registry, ref.repository, artifacts.tag_for(m.digest, provenance.KIND)),
                       raw, oci.OCI_MANIFEST)
        with pytest.raises(SignatureError, match="provenance of .* not an in-toto statement"):
            provenance.read(c, ref, m.digest)
