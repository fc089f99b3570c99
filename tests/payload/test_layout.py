"""The ``zip`` layout: pure-Python packages in one zip that zipimport reads, what must be
a file stays a file, nothing is in the layer twice, and the zip is reproducible.

The rules on a small site-packages made here (cheap); the built layer's shape on the real
payload (``slow``: the payload fixture). That the server runs from it is what the boot
and V0 tests show: they verify images of these very layers."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from imagefarm.payload.layer import SITE_PTH, SITE_ZIP, write_site_zip, zip_units

SITE = "agent-server/venv/lib/python3.13/site-packages"


def _site(root: Path) -> Path:
    files = {
        "pure/__init__.py": "X = 1\n", "pure/sub/m.py": "import os\n",
        "pure/__pycache__/__init__.cpython-313.pyc": "pyc", "pure/core.pyi": "stub",
        "ext/__init__.py": "", "ext/_speed.cpython-313-x86_64-linux-gnu.so": "elf",
        "reads/__init__.py": "import os\nDATA = os.path.join(os.path.dirname(__file__), 'd.json')\n",
        "reads/d.json": "{}",
        "unread/__init__.py": "", "unread/LICENSE.txt": "MIT",
        "ns/a/__init__.py": "", "ns/b/__init__.py": "", "ns/b/_c.abi3.so": "elf",
        "single.py": "", "single_reads.py": "print(__file__)\n",
        "pure-1.0.dist-info/METADATA": "Name: pure\n", "x.pth": "import os\n",
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_what_goes_into_the_zip_and_what_stays_a_file(tmp_path):
    site = _site(tmp_path / "site-packages")
    units = zip_units(site)
    # metadata, pure packages and modules, data nobody reads, the pure portion of a namespace
    assert units == ["ns/a", "pure", "pure-1.0.dist-info", "single.py", "unread"]
    assert "ns/b" not in units and "ext" not in units and "reads" not in units
    assert zip_units(site, ("pure",)) == ["ns/a", "pure-1.0.dist-info", "single.py", "unread"]


def test_the_zip_is_reproducible_and_zipimport_shaped(tmp_path):
    site = _site(tmp_path / "site-packages")
    units = zip_units(site)
    a, b = io.BytesIO(), io.BytesIO()
    write_site_zip(site, units, a, "cpython-313")
    (site / "pure/__init__.py").touch()  # mtimes never reach the zip
    write_site_zip(site, units, b, "cpython-313")
    assert a.getvalue() == b.getvalue()
    with zipfile.ZipFile(a) as zf:
        names = zf.namelist()
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    # the .pyc beside its .py (where zipimport looks), explicit directories, no stubs
    assert "pure/__init__.pyc" in names and "pure/__init__.py" in names and "pure/sub/" in names
    assert not any(n.endswith(".pyi") or "__pycache__" in n for n in names)


@pytest.mark.slow
def test_the_payload_layer_is_the_zip_layout(payload, settings, recipe):
    """Far fewer entries than the tree, the zip and its .pth in site-packages, every
    extension module a file, nothing both in the zip and on disk, unchecked-hash pycs."""
    from imagefarm.payload import payload_dir

    assert recipe.payload.layout == "zip"
    names, data = set(), None
    with tarfile.open(payload.layer.path, "r:gz") as tar:
        for m in tar:
            names.add(m.name)
            if m.name == f"{SITE}/{SITE_ZIP}":
                data = tar.extractfile(m).read()
            elif m.name == f"{SITE}/{SITE_PTH}":
                assert tar.extractfile(m).read() == f"{SITE_ZIP}\n".encode()
    assert data is not None and f"{SITE}/{SITE_PTH}" in names
    tree = payload_dir(settings) / "trees" / recipe.tree_digest.split(":", 1)[1][:24] / "tree"
    in_tree = sum(len(d) + len(f) for _p, d, f in __import__("os").walk(tree))
    assert len(names) < in_tree / 2, (len(names), in_tree)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        zipped = zf.namelist()
        flags = {int.from_bytes(zf.read(n)[4:8], "little") for n in zipped if n.endswith(".pyc")}
    assert flags == {0b01}
    assert not any(".so" in Path(n).suffixes for n in zipped if not n.endswith("/"))
    on_disk = {n[len(SITE) + 1:] for n in names if n.startswith(SITE + "/")}
    assert not on_disk & {n for n in zipped if not n.endswith("/")}
    # the server's web stack is imported from the zip only (verify then proves it runs)
    assert "fastapi/__init__.pyc" in zipped and "pydantic/main.pyc" in zipped
    assert "fastapi/__init__.py" not in on_disk
