"""Payload fixtures: the real payload, built once per session (cached in ~/.cache/imagefarm).

A cold cache costs about two minutes (debootstrap of the builder, the server's
install, precompile, gzip); afterwards the payload is a cache hit.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from imagefarm.payload import Payload, build_payload
from imagefarm.payload.recipe import Recipe, load_recipe
from imagefarm.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imaging import agent_image  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"  # recipes/ + test-only broken.toml


def _log(msg: str) -> None:
    print(f"[payload {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@pytest.fixture(scope="session")
def recipe() -> Recipe:
    return load_recipe("default", RECIPES)


@pytest.fixture(scope="session")
def broken_recipe() -> Recipe:
    return load_recipe("broken", RECIPES)


# ``payload`` (the default recipe's real payload) comes from tests/conftest.py


@pytest.fixture(scope="session")
def broken_payload(settings: Settings, broken_recipe: Recipe, payload: Payload) -> Payload:
    # same tree as the default recipe (payload built first): only the layer is written
    return build_payload(settings, broken_recipe, log=_log)


@pytest.fixture(scope="session")
def r2e_agent_image(fixtures, payload: Payload, recipe: Recipe) -> str:
    return agent_image(fixtures, "r2e", payload, recipe)


@pytest.fixture(scope="session")
def busybox_agent_image(fixtures, payload: Payload, recipe: Recipe) -> str:
    return agent_image(fixtures, "busybox", payload, recipe)


@pytest.fixture(scope="session")
def broken_agent_image(fixtures, broken_payload: Payload, broken_recipe: Recipe) -> str:
    return agent_image(fixtures, "r2e", broken_payload, broken_recipe)
