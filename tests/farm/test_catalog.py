"""Datasets: hub cache (offline), SkyRL parquet, plain files; bad rows reported."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagefarm.farm import catalog
from imagefarm.errors import DatasetError

HEX = "0123456789abcdef0123456789abcdef01234567"


def test_skyrl_parquet(tmp_path):
    rows = [
        {"prompt": "p", "data_source": "r2e-gym", "ability": "coding",
         "instance": {"instance_id": f"namanjain12/pandas_final:{HEX}", "repo": "pandas", "base_commit": "x"}},
        {"prompt": "p", "data_source": "r2e-gym", "ability": "coding",
         "instance": {"instance_id": f"namanjain12/pandas_final:{HEX}", "repo": "pandas", "base_commit": "y"}},
        {"prompt": "p", "data_source": "r2e-gym", "ability": "coding",
         "instance": {"instance_id": "Bad Image!!", "repo": "x", "base_commit": "z"}},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    val = [{"prompt": "p", "data_source": "swe-bench", "ability": "coding",
            "instance": {"instance_id": "astropy__astropy-12907", "repo": "astropy/astropy", "base_commit": "b"}}]
    pq.write_table(pa.Table.from_pylist(val), tmp_path / "validation.parquet")
    cat = catalog.load(str(tmp_path))
    assert [str(b) for b in cat.bases] == [
        f"docker.io/namanjain12/pandas_final:{HEX}",
        "docker.io/swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest",
    ]
    assert len(cat.instances) == 3  # duplicates collapse in bases, not in instances
    assert {i.split for i in cat.instances} == {"train", "validation"}
    assert len(cat.bad_rows) == 1 and cat.bad_rows[0].row == 2 and "whitespace" in cat.bad_rows[0].reason
    assert str(cat.bad_rows[0]).startswith("train.parquet row 2 (0-based): ")  # the third row, iloc[2]


def test_hub_dataset_from_local_cache_offline(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "datasets--R2E-Gym--R2E-Gym-Subset" / "snapshots" / ("a" * 40)
    (snap / "data").mkdir(parents=True)
    (cache / "datasets--R2E-Gym--R2E-Gym-Subset" / "refs").mkdir()
    (cache / "datasets--R2E-Gym--R2E-Gym-Subset" / "refs" / "main").write_text("a" * 40)
    rows = [{"repo_name": "pandas", "docker_image": f"namanjain12/pandas_final:{i:040x}", "commit_hash": "c"}
            for i in range(5)] + [{"repo_name": "x", "docker_image": None, "commit_hash": "c"}]
    pq.write_table(pa.Table.from_pylist(rows), snap / "data" / "train-00000-of-00001.parquet")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cat = catalog.load("R2E-Gym/R2E-Gym-Subset")
    assert len(cat.bases) == 5 and cat.bases[0].repository == "namanjain12/pandas_final"
    assert cat.instances[0].split == "train"
    assert len(cat.bad_rows) == 1 and "no image" in cat.bad_rows[0].reason
    with pytest.raises(DatasetError, match="not in the local cache"):
        catalog.load("R2E-Gym/R2E-Gym-V1")


def test_jsonl_and_text(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"docker_image": "namanjain12/numpy_final:1"}) + "\nnot json\n"
        + json.dumps({"image": "127.0.0.1:5000/x/y:2", "instance_id": "i2"}) + "\n"
    )
    cat = catalog.load(str(tmp_path / "a.jsonl"))
    assert [str(b) for b in cat.bases] == ["docker.io/namanjain12/numpy_final:1", "127.0.0.1:5000/x/y:2"]
    assert cat.instances[1].instance_id == "i2"
    assert cat.bad_rows[0].row == 2 and "not JSON" in cat.bad_rows[0].reason
    assert str(cat.bad_rows[0]).startswith("a.jsonl line 2: not JSON")  # the second line, as editors count
    (tmp_path / "list.txt").write_text("# bases\nnamanjain12/a:1\n\nnamanjain12/a:1\nnamanjain12/b:2  # comment\n")
    assert len(catalog.load(str(tmp_path / "list.txt")).bases) == 2
    (tmp_path / "bad.txt").write_text("# bases\nnamanjain12/a:1\n\nNot Valid\n")
    bad = catalog.load(str(tmp_path / "bad.txt")).bad_rows
    assert [str(b).split(":")[0] for b in bad] == ["bad.txt line 4"]
    (tmp_path / "blank.jsonl").write_text("\n" + json.dumps({"docker_image": "a/a:1"}) + "\n\n{\n")
    assert [b.row for b in catalog.load(str(tmp_path / "blank.jsonl")).bad_rows] == [4]  # blank lines count


def test_limit_counts_unique_bases(tmp_path):
    (tmp_path / "l.txt").write_text("a/a:1\na/a:1\na/b:1\na/c:1\n")
    cat = catalog.load(str(tmp_path / "l.txt")).limited(2)
    assert len(cat.bases) == 2 and len(cat.instances) == 3


def test_wrong_columns_is_a_clear_error(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"foo": 1, "bar": "x"}]), tmp_path / "train.parquet")
    with pytest.raises(DatasetError, match="no image column.*found foo, bar"):
        catalog.load(str(tmp_path / "train.parquet"))


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="neither a file"):
        catalog.load(str(tmp_path / "nope.parquet"))


def test_non_text_image_fields_are_bad_rows(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"docker_image": 5}\n{"instance": {"instance_id": ["x"]}}\n'
                                      '{"docker_image": "namanjain12/a:1"}\n')
    cat = catalog.load(str(tmp_path / "a.jsonl"))
    assert [str(b) for b in cat.bases] == ["docker.io/namanjain12/a:1"]
    assert [b.row for b in cat.bad_rows] == [1, 2]
    assert "docker_image is 5 (int)" in cat.bad_rows[0].reason
