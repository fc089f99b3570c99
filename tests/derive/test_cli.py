"""`imagefarm derive` end to end (console script, a synthetic payload layer file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from derivekit import push_base, file_layer, synthetic_payload


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).parent / "imagefarm")
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_derive_json_and_plain(dsettings, dreg, dwork, bb_layer):
    base = f"{dreg.host}/namanjain12/pandas_final:{'c' * 40}"
    push_base(dwork / "cli", base, [bb_layer, file_layer(dwork / "blobs", "x", "cli\n")])
    layer = synthetic_payload(dwork / "cli-payload").layer
    env = {**os.environ, "IMAGEFARM_STATE_DIR": str(dsettings.state_dir),
           "IMAGEFARM_CACHE_DIR": str(dsettings.cache_dir)}
    p = cli("derive", base, "--to", f"{dreg.host}/cli", "--payload-layer", str(layer.path), "--json", env=env)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["base"] == base and doc["skipped"] is False and doc["image"].startswith(f"{dreg.host}/cli/")
    assert doc["ref"] == f"{doc['image']}@{doc['digest']}"
    p = cli("derive", base, "--to", f"{dreg.host}/cli", "--payload-layer", str(layer.path), env=env)
    assert p.returncode == 0 and p.stdout.strip() == doc["ref"] and "skipped" in p.stderr
    p = cli("derive", f"{dreg.host}/namanjain12/pandas_final:{'d' * 40}", "--to", f"{dreg.host}/cli",
            "--payload-layer", str(layer.path), env=env)
    assert p.returncode == 2 and "not found" in p.stderr and "Traceback" not in p.stderr
