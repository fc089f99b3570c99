"""The v0 recipe as data and its launcher program (no build: seconds)."""

from __future__ import annotations

import ast
from pathlib import Path

from imagefarm.payload.layer import launcher_script, layer_entries
from imagefarm.payload.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_keys_added_for_v0_leave_existing_digests_alone() -> None:
    """A key at its default is not in the canonical form, so the default recipe keeps the
    digest its payload, tags and annotations were made under."""
    default = load_recipe("default", RECIPES)
    canon = default.canonical()
    assert "package" not in canon["agent_server"] and "check_import" not in canon["agent_server"]
    assert not {"launcher_style", "bash", "dirs"} & set(canon["payload"])
    v0 = load_recipe("v0", RECIPES)
    assert v0.canonical()["agent_server"]["package"] == "openhands-ai"
    assert v0.digest != default.digest and v0.tree_digest != default.tree_digest


def test_v0_installs_openhands_ai_and_answers_the_micromamba_command() -> None:
    v0 = load_recipe("v0", RECIPES)
    assert v0.requirements == ["openhands-ai==0.62.0"]
    assert v0.payload.launcher == "/openhands/micromamba/bin/micromamba"
    script = launcher_script(v0)
    ast.parse(script)
    assert script.startswith("#!/openhands/v0/venv/bin/python -I\n")
    assert "os.execv(sys.executable, [sys.executable, \"-I\", *_args])" in script
    assert "'SU_TO_USER': 'false'" in script


def test_layer_entries_name_each_directory_once(tmp_path) -> None:
    v0 = load_recipe("v0", RECIPES)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/python3.13").write_bytes(b"\x7fELF")
    (tmp_path / f"venv/lib/python{v0.builder.python}/site-packages").mkdir(parents=True)  # the zip layout reads it
    names = [e[0] for e in layer_entries(tmp_path, v0)]
    dirs = [n for n in names if n in ("openhands", "openhands/code", "openhands/micromamba",
                                      "openhands/micromamba/bin", "openhands/v0", "openhands/v0/import-cwd")]
    assert sorted(dirs) == sorted(set(dirs)) and len(set(dirs)) == 6
    assert "openhands/micromamba/bin/micromamba" in names
