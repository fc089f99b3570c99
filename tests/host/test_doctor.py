"""`imagefarm doctor` passes here and names the fix when a part is missing."""

import json
import os
import shutil
from pathlib import Path

from tests.conftest import imagefarm_cli


def test_doctor_passes_with_services(cli_env):
    proc = imagefarm_cli("doctor", "--json", env=cli_env)
    checks = {c["part"]: c for c in json.loads(proc.stdout)}
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert checks["podman run"]["ok"] and "runc" in checks["podman run"]["detail"]
    assert checks["registry"]["ok"] and checks["redis"]["ok"]


def test_doctor_fails_without_buildah(cli_env, tmp_path: Path):
    # a PATH holding every tool but buildah
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in os.environ["PATH"].split(":"):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            target = bin_dir / name
            if name != "buildah" and not target.exists() and os.access(os.path.join(d, name), os.X_OK):
                target.symlink_to(os.path.join(d, name))
    env = {**cli_env, "PATH": str(bin_dir)}
    assert shutil.which("buildah", path=env["PATH"]) is None
    proc = imagefarm_cli("doctor", env=env)
    assert proc.returncode == 1
    assert "buildah" in proc.stdout and "MISSING" in proc.stdout
    assert "apt-get install -y buildah" in proc.stdout


def test_doctor_fails_when_registry_down(cli_env):
    env = {**cli_env, "IMAGEFARM_TO": "127.0.0.1:9/prebuilt"}
    proc = imagefarm_cli("doctor", "--json", env=env)
    assert proc.returncode == 1
    reg = next(c for c in json.loads(proc.stdout) if c["part"] == "registry")
    assert not reg["ok"] and reg["fix"] == "imagefarm dev up"
