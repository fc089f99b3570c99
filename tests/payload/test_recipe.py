"""Recipes are data: parsed, validated, and identified by a stable digest."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagefarm.errors import ConfigError
from imagefarm.payload.recipe import PAYLOAD_FORMAT, load_recipe, parse_recipe, recipe_for
from imagefarm.settings import Settings

RECIPES = Path(__file__).resolve().parents[1] / "recipes"  # recipes/ + test-only broken.toml

MINIMAL = """
name = "mini"
[agent_server]
version = "1.58.2"
"""


def test_default_recipe_has_what_derive_needs() -> None:
    r = load_recipe("default", RECIPES)
    assert r.name == "default"
    assert r.kind == "append"
    assert r.agent_server_version == "1.58.2"
    assert r.digest.startswith("sha256:") and len(r.digest) == 71
    assert "LITELLM_LOCAL_MODEL_COST_MAP=True" in r.env
    assert r.command == ("/usr/local/bin/openhands-agent-server", "--port", "60000")
    assert r.builder.suite == "trixie" and r.builder.python == "3.13"
    assert r.requirements[0] == "openhands-agent-server==1.58.2"
    assert r.containerfile is None


def test_recipe_for_settings_and_path(tmp_path: Path) -> None:
    s = Settings(recipes_dir=RECIPES, state_dir=tmp_path, cache_dir=tmp_path)
    assert recipe_for(s).name == "default"
    assert recipe_for(s, "broken").name == "broken"
    assert recipe_for(s, str(RECIPES / "default.toml")).digest == recipe_for(s).digest


def test_digest_ignores_comments_order_and_description() -> None:
    a = parse_recipe(MINIMAL)
    b = parse_recipe('description = "words"\nname = "mini"  # comment\n\n[agent_server]\nversion = "1.58.2"\n')
    assert a.digest == b.digest


@pytest.mark.parametrize("change", [
    ('version = "1.58.2"', 'version = "1.58.1"'),
    ('name = "mini"', 'name = "other"'),
    ('[agent_server]', '[image]\nenv = ["A=1"]\n[agent_server]'),
])
def test_digest_changes_with_substance(change: tuple[str, str]) -> None:
    assert parse_recipe(MINIMAL).digest != parse_recipe(MINIMAL.replace(*change)).digest


def test_digest_is_stable_across_parses_and_includes_format() -> None:
    r = parse_recipe(MINIMAL)
    assert r.digest == parse_recipe(MINIMAL).digest
    assert r.canonical()["payload_format"] == PAYLOAD_FORMAT


def test_broken_recipe_shares_the_tree_of_default() -> None:
    default, broken = load_recipe("default", RECIPES), load_recipe("broken", RECIPES)
    assert default.tree_digest == broken.tree_digest
    assert default.digest != broken.digest
    assert broken.agent_server.module.endswith("no_such_module")


def test_recipe_is_frozen() -> None:
    r = parse_recipe(MINIMAL)
    with pytest.raises(Exception):
        r.name = "x"  # type: ignore[misc]


@pytest.mark.parametrize("text, words", [
    ("name = 'x'\n", "agent_server"),
    ('name = "Bad Name"\n[agent_server]\nversion = "1"\n', "recipe name"),
    ('name = "x"\nkind = "magic"\n[agent_server]\nversion = "1"\n', "kind"),
    ('name = "x"\nkind = "buildah"\n[agent_server]\nversion = "1"\n', "containerfile"),
    ('name = "x"\n[agent_server]\nversion = "1"\n[image]\nenv = ["NOEQUALS"]\n', "K=V"),
    ('name = "x"\n[agent_server]\nversion = "1"\n[image]\nbogus = 1\n', "bogus"),
    ('name = "x"\n[agent_server]\nversion = "1"\nunknown = 2\n', "unknown"),
    ('name = "x"\n[agent_server]\nversion = "1"\n[builder]\npython = "three"\n', "3.13"),
    ("name = [", "TOML"),
])
def test_bad_recipes_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_recipe(text, source="bad.toml")


def test_buildah_recipe_carries_its_containerfile() -> None:
    r = parse_recipe('name = "b"\nkind = "buildah"\n[agent_server]\nversion = "1.58.2"\n'
                     '[image]\ncontainerfile = "FROM {base}\\nRUN true\\n"\n')
    assert r.kind == "buildah" and r.containerfile.startswith("FROM {base}")


def test_unknown_recipe_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="known: broken, default"):
        load_recipe("nope", RECIPES)
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.toml"), RECIPES)
