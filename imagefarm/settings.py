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
    copies_per_source: int = Field(
        4, ge=1, description="cap on blobs copied at once from one source registry (per process)")
    mirrors: dict[str, str] = Field(
        default_factory=dict,
        description='registry -> the mirror its images are read through, as JSON ({"docker.io": '
                    '"127.0.0.1:5001"}, e.g. `imagefarm dev up --mirror docker.io`); images keep the '
                    "registry's name",
    )

    @classmethod
    def load(cls, **overrides: Any) -> "Settings":
        """Settings from the environment with flags (non-None values) on top; a bad
        value is one ``ConfigError`` naming the variable (the CLI prints one line)."""
        from pydantic import ValidationError
        from pydantic_settings import SettingsError

        from imagefarm.errors import ConfigError

        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except SettingsError as exc:  # a JSON-valued variable that is not JSON
            field = str(exc).split('"')[1] if '"' in str(exc) else "?"
            raise ConfigError(f"IMAGEFARM_{field.upper()} is not valid JSON") from None
        except ValidationError as exc:
            e = exc.errors()[0]
            where = ".".join(str(p) for p in e["loc"])
            raise ConfigError(f"IMAGEFARM_{str(e['loc'][0]).upper()} (or its flag): {where}: {e['msg']}") from None



def _repo_recipes() -> Path:
    here = Path(__file__).resolve().parent
    # a source checkout (editable install) has recipes/ beside the package; a wheel
    # carries them as the package data imagefarm/recipes
    for candidate in (here.parent / "recipes", here / "recipes"):
        if candidate.is_dir():
            return candidate
    return here.parent / "recipes"
