"""Launch helpers: preflight, dataset rewrite (read back with pyarrow), env, MIG."""

import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagefarm.farm import catalog
from imagefarm.serve import launch
from imagefarm.farm.lockfile import Entry, Lockfile

HEX = [f"{i:040x}" for i in range(4)]
RD = "sha256:" + "1" * 64


def entry(i, verified=True, recipe_digest=RD):
    base = f"docker.io/namanjain12/pandas_final:{HEX[i]}"
    return Entry(base, "train", base, "sha256:" + f"{i}" * 64,
                 f"reg.local:5000/pre/namanjain12/pandas_final:{HEX[i]}-oh1-abc", "sha256:" + f"{i + 5}" * 64,
                 "default", recipe_digest, "1.58.2", verified)


@pytest.fixture
def skyrl_dataset(tmp_path):
    d = tmp_path / "r2e-all"
    d.mkdir()
    rows = [{"prompt": "fix it", "data_source": "r2e-gym", "ability": "coding",
             "instance": {"instance_id": f"namanjain12/pandas_final:{HEX[i]}", "repo": "pandas"}} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), d / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), d / "validation.parquet")
    return d


def test_preflight_complete_missing_stale(skyrl_dataset):
    cat = catalog.load(str(skyrl_dataset))
    full = Lockfile((entry(0), entry(1), entry(2)))
    assert launch.preflight(cat, full, recipe_digest=RD, to="reg.local:5000/pre").ok
    partial = Lockfile((entry(0), entry(1, verified=False), entry(2, recipe_digest="sha256:" + "9" * 64)))
    res = launch.preflight(cat, partial, recipe_digest=RD, to="reg.local:5000/pre")
    reasons = {p.base.rsplit(":", 1)[1]: p.reason for p in res.problems}
    assert reasons == {HEX[1]: "unverified", HEX[2]: "stale-recipe"}
    missing = launch.preflight(cat, Lockfile((entry(0),)), recipe_digest=RD, to="reg.local:5000/pre")
    assert {p.reason for p in missing.problems} == {"missing"}
    assert all(p.fix.startswith("imagefarm derive docker.io/namanjain12/pandas_final:") for p in missing.problems)
    gone = launch.preflight(cat, full, recipe_digest=RD, to="x", exists=lambda e: e.image_digest != entry(1).image_digest)
    assert [p.reason for p in gone.problems] == ["gone-from-registry"]


def test_rewrite_pins_every_row(skyrl_dataset, tmp_path):
    lock = Lockfile((entry(0), entry(1), entry(2)))
    out = tmp_path / "pinned"
    written = launch.rewrite_dataset(str(skyrl_dataset), lock, out)
    assert sorted((p.name, n, k) for p, n, k in written) == [("train.parquet", 3, 3), ("validation.parquet", 1, 1)]
    rows = pq.read_table(out / "train.parquet").to_pylist()
    for i, row in enumerate(rows):
        assert row["instance"]["instance_id"] == entry(i).pinned
        assert "@sha256:" in row["instance"]["instance_id"]
        assert row["prompt"] == "fix it" and row["instance"]["repo"] == "pandas"


def test_env_file_and_ray_env(tmp_path):
    path = launch.env_file(tmp_path / "train.env", {"SANDBOX_REMOTE_RUNTIME_API_URL": "http://n1:8000",
                                                    "ALLHANDS_API_KEY": "s3cr et'"})
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert launch.read_env_file(path)["ALLHANDS_API_KEY"] == "s3cr et'"
    out = subprocess.run(["bash", "-c", f". {path}; echo \"$ALLHANDS_API_KEY|$SANDBOX_REMOTE_RUNTIME_API_URL\""],
                         capture_output=True, text=True).stdout.strip()
    assert out == "s3cr et'|http://n1:8000"
    ppo = {"env_vars": {"TOKENIZERS_PARALLELISM": "true"}}
    launch.ray_env(ppo, environ={"SANDBOX_REMOTE_RUNTIME_API_URL": "http://n1:8000", "ALLHANDS_API_KEY": "k"})
    assert ppo["env_vars"] == {"TOKENIZERS_PARALLELISM": "true", "SANDBOX_REMOTE_RUNTIME_API_URL": "http://n1:8000",
                               "ALLHANDS_API_KEY": "k"}


@pytest.mark.parametrize("value,expected", [
    ("MIG-GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3f/7/0", "0"),
    ("MIG-5c89852c-d268-c3f3-1b07-005d5ae1dc3f,MIG-6d89852c-d268-c3f3-1b07-005d5ae1dc3f", "0,1"),
    ("GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3f,1", "0,1"),
    ("0,1,2", "0,1,2"),
    ("3", "3"),
    ("", ""),
    (None, None),
])
def test_mig_remap(value, expected):
    assert launch.remap_cuda_visible_devices(value) == expected
    env = {} if value is None else {"CUDA_VISIBLE_DEVICES": value}
    launch.apply_mig_fix(env)
    assert env.get("CUDA_VISIBLE_DEVICES") == expected


@pytest.mark.parametrize("value,expected", [
    ("MIG-GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3f/7/0", "0"),
    ("MIG-aaa,MIG-bbb,MIG-ccc", "0,1,2"),
    ("0,1", "0,1"),
])
def test_mig_shell_snippet(value, expected):
    out = subprocess.run(["bash", "-c", launch.MIG_FIX_SH + 'echo "$CUDA_VISIBLE_DEVICES"'],
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": value}, capture_output=True, text=True)
    assert out.stdout.strip() == expected
