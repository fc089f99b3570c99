"""The payload layer: the tree at the recipe's prefix plus the launcher, whose program is
the data file ``launcher.py.tmpl`` (package data) filled in per recipe."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from string import Template

from imagefarm import oci
from .recipe import Recipe

#: the ``openhands-agent-server`` program; ``${name}`` fields are filled by ``launcher_script``
LAUNCHER = Template(files(__package__).joinpath("launcher.py.tmpl").read_text())

#: an empty directory of the payload: the launcher's working directory while it imports
IMPORT_CWD = "{prefix}/import-cwd"


def launcher_script(recipe: Recipe) -> str:
    """The ``openhands-agent-server`` command: a Python script run by the payload's venv.

    ``-I``: the base's PYTHONPATH/PYTHONHOME never reach the payload's interpreter.
    """
    prefix = recipe.payload.prefix
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", **recipe.payload.launcher_env}
    tools = f"{prefix}/tools/bin" if recipe.payload.tmux else ""
    return LAUNCHER.substitute(
        prefix=prefix, version=recipe.agent_server_version, recipe=recipe.name, recipe_digest=recipe.digest[:19],
        env=repr(env), tools=repr(tools), import_cwd=repr(IMPORT_CWD.format(prefix=prefix)),
        module=repr(recipe.agent_server.module), function=repr(recipe.agent_server.function))


def layer_entries(tree: Path, recipe: Recipe):
    """Tar entries of the payload layer: the tree at PREFIX plus the launcher."""
    prefix = recipe.payload.prefix.strip("/")
    yield oci.dir_entry(prefix)
    yield from oci._walk(tree, prefix)  # noqa: SLF001 - the same reproducible walk as root=
    yield oci.dir_entry(IMPORT_CWD.format(prefix=prefix))
    launcher = recipe.payload.launcher.strip("/")
    parts = launcher.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        yield oci.dir_entry("/".join(parts[:i]))
    yield oci.file_entry(launcher, launcher_script(recipe).encode(), mode=0o755)
