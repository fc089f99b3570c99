"""The payload layer: built for real, cached, reproducible, self-contained."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from imagefarm.payload import build_payload, launcher_script, load_payload
from imagefarm.payload.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"  # recipes/ + test-only broken.toml
IMAGEFARM = str(Path(sys.executable).parent / "imagefarm")


def test_launcher_is_python_run_by_the_payload_interpreter() -> None:
    recipe = load_recipe("default", RECIPES)
    text = launcher_script(recipe)
    assert text.startswith("#!/agent-server/venv/bin/python -I\n")  # kernel runs it: no /bin/sh
    compile(text, "openhands-agent-server", "exec")
    assert "os.environ.setdefault(_key, _value)" in text and "LITELLM_LOCAL_MODEL_COST_MAP" in text
    assert "openhands.agent_server.__main__" in text and "LD_LIBRARY_PATH" not in text
    broken = launcher_script(load_recipe("broken", RECIPES))
    assert "no_such_module" in broken


@pytest.mark.slow
def test_payload_builds_and_is_a_cache_hit(settings, recipe, payload) -> None:
    assert payload.recipe_digest == recipe.digest
    assert payload.agent_server_version == "1.58.2"
    assert payload.layer.path.stat().st_size == payload.layer.size
    assert "sha256:" + hashlib.sha256(payload.layer.path.read_bytes()).hexdigest() == payload.layer.digest
    assert load_payload(settings, recipe) == payload
    mtime = payload.layer.path.stat().st_mtime_ns
    said: list[str] = []
    again = build_payload(settings, recipe, log=said.append)
    assert again.layer.digest == payload.layer.digest
    # a cache hit: nothing built (the builder logs every step) and the layer file untouched
    assert said == [] and payload.layer.path.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_layer_is_self_contained_and_normalised(payload) -> None:
    """One pass over the tar: owners, mtimes, launcher, bundled glibc, unchecked-hash pycs."""
    names = set()
    pyc_flags = set()
    with tarfile.open(payload.layer.path, "r:gz") as tar:
        for m in tar:
            names.add(m.name)
            assert (m.uid, m.gid, m.mtime) == (0, 0, 0), m.name
            assert not m.name.startswith(("/", "..")) and m.name.split("/")[0] in ("agent-server", "usr"), m.name
            assert not (m.mode & 0o022) or m.issym(), f"{m.name} is group/other writable"
            if m.name == "usr/local/bin/openhands-agent-server":
                assert m.mode & 0o111
                assert tar.extractfile(m).read().startswith(b"#!/agent-server/venv/bin/python")
            elif m.name.endswith(".pyc") and m.size > 16:
                pyc_flags.add(int.from_bytes(tar.extractfile(m).read(8)[4:8], "little"))
    for required in ("agent-server/bin/python3.13", "agent-server/syslib/libc.so.6",
                     "agent-server/syslib/ld-linux-x86-64.so.2", "agent-server/syslib/libgcc_s.so.1",
                     "agent-server/venv/pyvenv.cfg", "agent-server/tools/bin/tmux",
                     "agent-server/venv/lib/python3.13/site-packages/openhands/agent_server/__main__.py",
                     "usr/local/bin/openhands-agent-server"):
        assert required in names, required
    assert not any("/test/" in n and n.startswith("agent-server/lib/python3.13/test/") for n in names)
    assert pyc_flags == {0b01}, "pycs must be hash based and unchecked (reproducible, never rewritten)"


@pytest.mark.slow
def test_bundled_python_uses_its_own_loader_and_rpath(settings, payload, recipe) -> None:
    """patchelf results, read on the host from the cached tree (no chroot)."""
    from imagefarm.payload import payload_dir

    tree = payload_dir(settings) / "trees" / recipe.tree_digest.split(":", 1)[1][:24] / "tree"
    py = tree / "bin/python3.13"
    interp = subprocess.run(["patchelf", "--print-interpreter", str(py)], capture_output=True, text=True)
    rpath = subprocess.run(["patchelf", "--print-rpath", str(py)], capture_output=True, text=True)
    assert interp.stdout.strip() == "/agent-server/syslib/ld-linux-x86-64.so.2"
    assert rpath.stdout.strip() == "/agent-server/syslib"
    cfg = (tree / "venv/pyvenv.cfg").read_text()
    assert "home = /agent-server/bin" in cfg


@pytest.mark.soak
def test_full_rebuild_gives_identical_bytes(settings, recipe, payload) -> None:
    """Tree and layer again from the cached builder rootfs: the same blob, byte for byte
    (about 2 minutes, so run by hand with ``pytest -m soak``, and after any change to
    payload/: it subsumes rewriting the layer from the cached tree)."""
    rebuilt = build_payload(settings, recipe, force=True)
    assert rebuilt.layer.digest == payload.layer.digest
    assert rebuilt.layer.diff_id == payload.layer.diff_id


@pytest.mark.slow
def test_payload_cli(settings, payload, recipe) -> None:
    env = {**os.environ, "IMAGEFARM_CACHE_DIR": str(settings.cache_dir),
           "IMAGEFARM_STATE_DIR": str(settings.state_dir), "IMAGEFARM_RECIPES_DIR": str(RECIPES)}
    show = subprocess.run([IMAGEFARM, "payload", "show", "--json"], capture_output=True, text=True, env=env)
    assert show.returncode == 0, show.stderr
    data = json.loads(show.stdout)
    assert data["digest"] == payload.layer.digest and data["agent_server_version"] == "1.58.2"
    build = subprocess.run([IMAGEFARM, "payload", "build", "--json"], capture_output=True, text=True, env=env)
    assert build.returncode == 0, build.stderr
    assert json.loads(build.stdout)["cached"] is True
    human = subprocess.run([IMAGEFARM, "payload", "show"], capture_output=True, text=True, env=env)
    assert payload.layer.digest in human.stdout and "MB compressed" in human.stdout


def test_payload_show_says_how_to_build(tmp_path) -> None:
    env = {**os.environ, "IMAGEFARM_CACHE_DIR": str(tmp_path), "IMAGEFARM_STATE_DIR": str(tmp_path),
           "IMAGEFARM_RECIPES_DIR": str(RECIPES)}
    show = subprocess.run([IMAGEFARM, "payload", "show"], capture_output=True, text=True, env=env)
    assert show.returncode == 1
    assert "imagefarm payload build --recipe default" in show.stderr.replace("\n", " ")


def test_a_layer_of_another_layout_is_a_cache_miss(tmp_path) -> None:
    """The cache is keyed by recipe digest; a layer written by an older ``layer_entries``
    (another ``LAYER_FORMAT``) must be rebuilt, not shipped under the same recipe."""
    from imagefarm import oci
    from imagefarm.payload.cache import Payload, record_path
    from imagefarm.payload.layer import LAYER_FORMAT
    from imagefarm.settings import Settings

    settings = Settings(state_dir=tmp_path, cache_dir=tmp_path, recipes_dir=RECIPES)
    recipe = load_recipe("default", RECIPES)
    blob = tmp_path / "blob"
    blob.write_bytes(b"layer")
    layer = oci.Layer(blob, "sha256:" + hashlib.sha256(b"layer").hexdigest(), 5, "sha256:" + "0" * 64)
    record = Payload(recipe.name, recipe.digest, recipe.agent_server_version, layer).to_json()
    assert record["layer_format"] == LAYER_FORMAT
    rec = record_path(settings, recipe)
    rec.parent.mkdir(parents=True)
    rec.write_text(json.dumps(record))
    assert load_payload(settings, recipe) is not None
    rec.write_text(json.dumps({**record, "layer_format": LAYER_FORMAT - 1}))
    assert load_payload(settings, recipe) is None
    del record["layer_format"]
    rec.write_text(json.dumps(record))
    assert load_payload(settings, recipe) is None
