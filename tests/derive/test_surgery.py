"""Manifest surgery and registry auth helpers as pure functions."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from imagefarm import oci
from imagefarm.derive import AppendPayload
from imagefarm.derive.surgery import derived_config, derived_manifest, merge_env
from imagefarm.errors import ConfigError, DeriveError
from imagefarm.registry.auth import load_credentials, parse_challenge
from imagefarm.registry.manifests import parse_manifest

LAYER = {"mediaType": oci.DOCKER_LAYER_GZIP, "digest": "sha256:" + "1" * 64, "size": 10}
MANIFEST = parse_manifest(json.dumps({"schemaVersion": 2, "mediaType": oci.DOCKER_MANIFEST, "layers": [LAYER],
                             "config": {"mediaType": oci.DOCKER_CONFIG, "digest": "sha256:" + "2" * 64,
                                        "size": 5}}).encode())
CONFIG = {"architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
          "config": {"Env": ["PATH=/testbed/.venv/bin:/bin", "A=1"], "WorkingDir": "/testbed", "User": "1000"},
          "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "3" * 64]}, "history": [{"created_by": "base"}]}
PAYLOAD = AppendPayload(oci.Layer(Path("/nonexistent"), "sha256:" + "4" * 64, 99, "sha256:" + "5" * 64),
                        "default", "sha256:" + "6" * 64, "1.58.2", ("A=2", "B=3"))


def test_config_and_manifest_are_pure_and_deterministic():
    before = json.dumps(CONFIG, sort_keys=True)
    cfg1 = derived_config(CONFIG, MANIFEST, PAYLOAD, {"l": "v"})
    assert json.dumps(CONFIG, sort_keys=True) == before  # input untouched
    assert cfg1 == derived_config(json.loads(before), MANIFEST, PAYLOAD, {"l": "v"})
    cfg = json.loads(cfg1)
    assert cfg["config"]["Env"] == ["PATH=/testbed/.venv/bin:/bin", "A=2", "B=3"]
    assert cfg["rootfs"]["diff_ids"][-1] == PAYLOAD.layer.diff_id and cfg["created"] == CONFIG["created"]
    m = json.loads(derived_manifest(MANIFEST, cfg1, PAYLOAD, {"k": "v"}))
    assert m["layers"][0]["mediaType"] == oci.OCI_LAYER_GZIP  # docker type -> OCI, same blob
    assert m["layers"][1]["digest"] == PAYLOAD.layer.digest and m["annotations"] == {"k": "v"}
    assert m["config"]["digest"] == oci.sha256_digest(cfg1)


def test_bad_bases_and_env():
    broken = {**CONFIG, "rootfs": {"type": "layers", "diff_ids": []}}
    with pytest.raises(DeriveError, match="0 diff_ids for 1 layers"):
        derived_config(broken, MANIFEST, PAYLOAD, {})
    with pytest.raises(DeriveError, match="sets PATH"):
        merge_env(["PATH=/bin"], ["PATH=/x"])
    with pytest.raises(DeriveError, match="not K=V"):
        merge_env([], ["nonsense"])


def test_challenge_parsing():
    ch = parse_challenge('Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull"')
    assert (ch.scheme, ch.realm, ch.service, ch.scope) == ("bearer", "https://auth.example/token", "reg",
                                                           "repository:a/b:pull")
    assert parse_challenge('Basic realm="x"').scheme == "basic"
    assert parse_challenge("Negotiate") is None


def test_auth_file_lookup(tmp_path, monkeypatch):
    auth = base64.b64encode(b"farm:pa:ss").decode()
    f = tmp_path / "auth.json"
    f.write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": auth},
                                       "127.0.0.1:5000": {"auth": auth}}}))
    creds = load_credentials(f)
    assert creds["docker.io"].password == "pa:ss" and creds["127.0.0.1:5000"].username == "farm"
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(f))
    assert "docker.io" in load_credentials()
    with pytest.raises(ConfigError, match="does not exist"):
        load_credentials(tmp_path / "missing.json")
