import gzip
import hashlib
import tarfile

from imagefarm import oci
from imagefarm.settings import Settings


def test_env_then_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGEFARM_TO", "reg.example:5000/farm")
    monkeypatch.setenv("IMAGEFARM_INSECURE_REGISTRIES", '["reg.example:5000"]')
    assert Settings.load().to == "reg.example:5000/farm"
    assert Settings.load().insecure_registries == ["reg.example:5000"]
    assert Settings.load(to="127.0.0.1:1/x").to == "127.0.0.1:1/x"
    assert Settings.load(to=None).to == "reg.example:5000/farm"


def test_layer_is_reproducible_and_digests_are_right(tmp_path):
    root = tmp_path / "tree"
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/tool").write_text("#!/bin/sh\necho hi\n")
    (root / "usr/local/bin/tool").chmod(0o755)
    (root / "usr/local/bin/link").symlink_to("tool")
    a = oci.write_layer(None, tmp_path / "a", root=root)
    (root / "usr/local/bin/tool").touch()  # a new mtime must not change the blob
    b = oci.write_layer(None, tmp_path / "b", root=root)
    assert a.digest == b.digest and a.diff_id == b.diff_id
    data = a.path.read_bytes()
    assert a.digest == "sha256:" + hashlib.sha256(data).hexdigest() and a.size == len(data)
    raw = gzip.decompress(data)
    assert a.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    with tarfile.open(a.path) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["usr/local/bin/tool"].mode & 0o111
    assert members["usr/local/bin/link"].issym()
    assert all(m.mtime == 0 and m.uid == 0 for m in members.values())


def test_layer_exclude(tmp_path):
    root = tmp_path / "tree"
    (root / "keep").mkdir(parents=True)
    (root / "skip").mkdir()
    (root / "skip/f").write_text("x")
    (root / "keep/f").write_text("x")
    layer = oci.write_layer(None, tmp_path / "o", root=root, exclude=frozenset({"skip"}))
    with tarfile.open(layer.path) as tar:
        names = tar.getnames()
    assert "keep/f" in names and not any(n.startswith("skip") for n in names)
