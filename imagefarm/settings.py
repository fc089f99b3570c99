"""One settings model for every command: flags override ``IMAGEFARM_*`` variables.

The same name means the same thing everywhere: ``--to`` / ``IMAGEFARM_TO`` is the
registry prefix that prebuilt images go to in derive, prebuild, lookup, runtime
serve and launch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _xdg(var: str, fallback: str) -> Path:
    return Path(os.environ.get(var) or Path.home() / fallback)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEFARM_", frozen=True, extra="forbid")

    to: str = Field(
        "127.0.0.1:5000/prebuilt",
        description="registry prefix prebuilt images are pushed to and looked up in",
    )
    recipe: str = Field("default", description="recipe name (a file in recipes/) or path")
    platform: str = Field("linux/amd64", description="platform chosen from image indexes")
    insecure_registries: list[str] = Field(
        default_factory=list,
        description="registries spoken to over plain HTTP besides localhost/127.0.0.1",
    )
    auth_file: Path | None = Field(
        None, description="docker/podman auth file (default: the usual places)"
    )
    payload_from: str | None = Field(
        None, description="registry prefix to find the payload in when the cache lacks it (after --to)",
    )
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker and backend")
    state_dir: Path = Field(
        default_factory=lambda: _xdg("XDG_STATE_HOME", ".local/state") / "imagefarm",
        description="container storage, job state, runtime server state",
    )
    cache_dir: Path = Field(
        default_factory=lambda: _xdg("XDG_CACHE_HOME", ".cache") / "imagefarm",
        description="payload blobs, builder rootfs, fixture rootfs",
    )
    recipes_dir: Path = Field(
        default_factory=lambda: _repo_recipes(), description="where recipe files live"
    )
    registry_concurrency: int = Field(16, ge=1, description="cap on parallel registry calls")

    @classmethod
    def load(cls, **overrides: Any) -> "Settings":
        """Settings from the environment with flags (non-None values) on top."""
        return cls(**{k: v for k, v in overrides.items() if v is not None})



def _repo_recipes() -> Path:
    here = Path(__file__).resolve().parent
    # a source checkout (editable install) has recipes/ beside the package; a wheel
    # carries them as the package data imagefarm/recipes
    for candidate in (here.parent / "recipes", here / "recipes"):
        if candidate.is_dir():
            return candidate
    return here.parent / "recipes"
