"""Recipes: what goes into an agent-server image, as data.

A recipe is a TOML file in ``recipes/`` (see ``recipes/README.md``)::

    name = "default"
    kind = "append"                  # "append": one payload layer; "buildah": RUN steps
    [agent_server]
    version = "1.58.2"
    [image]
    env = ["LITELLM_LOCAL_MODEL_COST_MAP=True"]

``load_recipe`` parses and validates it into a frozen ``Recipe`` whose ``digest``
is the sha256 of its canonical content (plus ``PAYLOAD_FORMAT``, so a change in how
the payload is built also changes the digest): comments and key order never change
it, any change of substance does.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imagefarm.errors import ConfigError
from imagefarm.oci import canonical_json
from imagefarm.settings import check_version

#: bump when the way a payload is built changes (it is part of every recipe digest)
PAYLOAD_FORMAT = 2
#: how the launcher and layer are made from the tree (in the recipe digest, not the tree's)
LAUNCHER_FORMAT = 2

#: what a recipe name looks like (a name from a request is checked with it: never a path)
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AgentServerSpec(_Frozen):
    package: str = Field(
        default="openhands-agent-server",
        description="the PyPI distribution installed at `version` (openhands-ai for the V0 server)")
    version: str = Field(description="version of `package` from PyPI")
    extra_packages: tuple[str, ...] = Field(
        default=(), description="more pip requirements installed beside the server")
    exclude_newer: str | None = Field(
        default=None,
        description="resolve dependencies as of this date (uv --exclude-newer), for reproducible rebuilds")
    module: str = Field(
        default="openhands.agent_server.__main__",
        description="module whose main() the launcher runs")
    function: str = Field(default="main", description="function of `module` the launcher calls")
    check_import: str = Field(
        default="openhands.agent_server.api",
        description="module the build imports to prove the payload loads nothing from outside it")


class BuilderSpec(_Frozen):
    suite: str = Field(default="trixie", description="Debian suite of the builder rootfs")
    mirror: str | None = Field(
        default=None, exclude=True,
        description="Debian mirror; default: this machine's apt sources (payload/mirror.py). "
                    "Not part of any digest: where a package comes from does not change it")
    python: str = Field(default="3.13", description="the builder's python3.X, copied into the payload")
    packages: tuple[str, ...] = Field(
        default=("python3", "python3-venv", "ca-certificates", "patchelf", "tmux"),
        description="Debian packages debootstrap installs into the builder")

    @field_validator("python")
    @classmethod
    def _py(cls, v: str) -> str:
        if not re.fullmatch(r"3\.\d{1,2}", v):
            raise ValueError(f"python must look like 3.13, not {v!r}")
        return v


class PayloadSpec(_Frozen):
    prefix: str = Field(default="/agent-server", description="where the relocatable tree lives")
    launcher: str = Field(default="/usr/local/bin/openhands-agent-server")
    launcher_style: Literal["entrypoint", "micromamba"] = Field(
        default="entrypoint",
        description="entrypoint: the launcher calls module.function; micromamba: it answers "
                    "`micromamba run -n ENV [poetry run] python ARGS` (the V0 command) with the payload's python")
    tmux: bool = Field(default=True, description="ship a private tmux under PREFIX/tools/bin")
    bash: bool = Field(default=False, description="ship a private bash under PREFIX/tools/bin "
                                                   "(and the C.UTF-8 locale tmux needs) for bases without them")
    dirs: tuple[str, ...] = Field(default=(), description="empty directories the layer adds (e.g. /openhands/code)")
    append_args: tuple[str, ...] = Field(
        default=(), description="micromamba launcher: arguments appended to the client's (the last wins in argparse)")
    precompile: bool = Field(default=True, description="ship .pyc (unchecked-hash) for fast cold start")
    drop: tuple[str, ...] = Field(
        default=("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data"),
        description="stdlib packages left out")
    launcher_env: dict[str, str] = Field(
        default_factory=dict,
        description="os.environ.setdefault(...) in the launcher, before any import")
    layout: Literal["tree", "zip"] = Field(
        default="tree",
        description="tree: every file of the venv as a file; zip: pure-Python packages (and all "
                    "package metadata) in one zip that zipimport reads, only extension modules and "
                    "packages that read their own files through __file__ stay files (layer.py)")
    prune: tuple[str, ...] = Field(
        default=(), description="site-packages paths left out of the layer (never imported by the server)")


class Recipe(_Frozen):
    """A parsed, validated recipe. ``digest`` identifies what it puts into images."""

    name: str
    kind: Literal["append", "buildah"] = "append"
    description: str = Field(default="", exclude=True, description="for people; not part of the digest")
    agent_server: AgentServerSpec
    builder: BuilderSpec = BuilderSpec()
    payload: PayloadSpec = PayloadSpec()
    env: tuple[str, ...] = Field(default=(), description='"K=V" added to the image config')
    command: tuple[str, ...] = ("/usr/local/bin/openhands-agent-server", "--port", "60000")
    ready: tuple[str, ...] = Field(
        default=("/alive", "/health"),
        description="paths that answer 2xx once the server serves (verify and the runtime probe them)")
    containerfile: str | None = Field(
        default=None, description="Containerfile template (kind = buildah); {base} is the base ref")
    source: str = Field(default="", exclude=True, description="file it was read from")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"recipe name {v!r} must match {NAME_RE.pattern}")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            if not _ENV.match(item):
                raise ValueError(f"env item {item!r} is not K=V")
        return v

    @model_validator(mode="after")
    def _buildah_needs_containerfile(self) -> "Recipe":
        if self.kind == "buildah" and not self.containerfile:
            raise ValueError("a buildah recipe needs a `containerfile` template")
        return self

    # -- identity ---------------------------------------------------------------
    def canonical(self) -> dict[str, Any]:
        return {"payload_format": PAYLOAD_FORMAT, "launcher_format": LAUNCHER_FORMAT,
                **_without_new_defaults(self.model_dump(mode="json"))}

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(canonical_json(self.canonical())).hexdigest()

    @property
    def agent_server_version(self) -> str:
        return self.agent_server.version

    def at_version(self, version: str) -> "Recipe":
        """The same recipe with another openhands-agent-server version: a new frozen value
        with its own digest (so its own payload, tags and annotations). The rest stays,
        ``exclude_newer`` too: an older release resolves under the same date cap."""
        if version == self.agent_server.version:
            return self
        try:
            check_version(version)
        except ValueError as exc:
            raise ConfigError(f"agent-server version {exc}") from None
        return self.model_copy(update={"agent_server": self.agent_server.model_copy(update={"version": version})})

    @property
    def tree_digest(self) -> str:
        """Digest of what the installed tree depends on (not the launcher/env):
        two recipes that differ only in their launcher share one built tree."""
        tree = {
            "payload_format": PAYLOAD_FORMAT,
            "agent_server": self.agent_server.model_dump(mode="json", exclude={"module", "function"}),
            "builder": self.builder.model_dump(mode="json"),
            "prefix": self.payload.prefix,
            "tmux": self.payload.tmux,
            "bash": self.payload.bash,
            "precompile": self.payload.precompile,
            "drop": list(self.payload.drop),
        }
        tree = _without_new_defaults(tree)
        return "sha256:" + hashlib.sha256(canonical_json(tree)).hexdigest()

    @property
    def requirements(self) -> list[str]:
        return [f"{self.agent_server.package}=={self.agent_server.version}", *self.agent_server.extra_packages]


#: keys added after recipes were in use, with their defaults: left out of the digests when
#: at the default, so an existing recipe keeps its digest (and its built payload and tags)
_NEW_DEFAULTS = {
    "agent_server": {"package": "openhands-agent-server", "check_import": "openhands.agent_server.api"},
    "payload": {"launcher_style": "entrypoint", "bash": False, "dirs": [], "append_args": [],
                "layout": "tree", "prune": []},
    "": {"bash": False, "ready": ["/alive", "/health"]},  # top-level keys (tree_digest's and the recipe's)
}


def _without_new_defaults(d: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in d.items() if not (k in _NEW_DEFAULTS[""] and v == _NEW_DEFAULTS[""][k])}
    for section, defaults in _NEW_DEFAULTS.items():
        if section and isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if not (k in defaults and v == defaults[k])}
    return out


def parse_recipe(text: str, *, source: str = "<string>") -> Recipe:
    """Parse TOML text into a ``Recipe`` (``ConfigError`` naming the problem)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {source}: not valid TOML: {exc}") from None
    image = data.pop("image", {}) or {}
    if not isinstance(image, dict):
        raise ConfigError(f"recipe {source}: [image] must be a table")
    for key in ("env", "command", "ready", "containerfile"):
        if key in image:
            data[key] = image.pop(key)
    if image:
        raise ConfigError(f"recipe {source}: unknown [image] keys {sorted(image)}")
    try:
        return Recipe(**data, source=source)
    except (ValidationError, ValueError, TypeError) as exc:
        raise ConfigError(f"recipe {source}: {exc}") from None


def recipe_path(name_or_path: str, recipes_dir: Path) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or "/" in name_or_path:
        if p.is_file():
            return p
        raise ConfigError(f"recipe file {p} does not exist")
    candidate = Path(recipes_dir) / f"{name_or_path}.toml"
    if candidate.is_file():
        return candidate
    known = sorted(x.stem for x in Path(recipes_dir).glob("*.toml")) if Path(recipes_dir).is_dir() else []
    raise ConfigError(
        f"no recipe named {name_or_path!r} in {recipes_dir} (known: {', '.join(known) or 'none'})")


def load_recipe(name_or_path: str, recipes_dir: Path) -> Recipe:
    """Load a recipe by name (``recipes_dir/NAME.toml``) or by path."""
    path = recipe_path(name_or_path, recipes_dir)
    recipe = parse_recipe(path.read_text(), source=str(path))
    if path.suffix == ".toml" and recipe.name != path.stem and path.parent == Path(recipes_dir):
        raise ConfigError(f"recipe {path}: name {recipe.name!r} differs from its file name")
    return recipe


def recipe_for(settings: Any, name: str | None = None) -> Recipe:
    """The recipe the settings name (``--recipe`` / ``IMAGEFARM_RECIPE``), at the settings'
    ``--agent-server-version`` / ``IMAGEFARM_AGENT_SERVER_VERSION`` when one is given."""
    recipe = load_recipe(name or settings.recipe, settings.recipes_dir)
    version = getattr(settings, "agent_server_version", None)
    return recipe.at_version(version) if version else recipe
