"""The payload layer: the tree at the recipe's prefix plus the launcher, whose program is
made of package data files filled in per recipe: ``launcher_env.py.tmpl`` (environment,
HOME, private tools on PATH) then, by ``payload.launcher_style``, ``launcher.py.tmpl``
(call the server's function) or ``micromamba.py.tmpl`` (answer the V0 command)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from string import Template

from imagefarm import oci
from .recipe import Recipe

def _template(name: str) -> Template:
    return Template(files(__package__).joinpath(name).read_text())


#: the launcher programs; ``${name}`` fields are filled by ``launcher_script``
LAUNCHER_ENV = _template("launcher_env.py.tmpl")
LAUNCHERS = {"entrypoint": _template("launcher.py.tmpl"), "micromamba": _template("micromamba.py.tmpl")}

#: an empty directory of the payload: the launcher's working directory while it imports
IMPORT_CWD = "{prefix}/import-cwd"


def launcher_script(recipe: Recipe) -> str:
    """The recipe's launcher command: a Python script run by the payload's venv.

    ``-I``: the base's PYTHONPATH/PYTHONHOME never reach the payload's interpreter.
    """
    prefix = recipe.payload.prefix
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", **recipe.payload.launcher_env}
    tools = f"{prefix}/tools/bin" if recipe.payload.tmux or recipe.payload.bash else ""
    fields = dict(
        prefix=prefix, package=recipe.agent_server.package, version=recipe.agent_server_version,
        recipe=recipe.name, recipe_digest=recipe.digest[:19], env=repr(env), tools=repr(tools),
        import_cwd=repr(IMPORT_CWD.format(prefix=prefix)), module=repr(recipe.agent_server.module),
        function=repr(recipe.agent_server.function), python=recipe.builder.python,
        bash=repr(f"{prefix}/tools/bin/bash" if recipe.payload.bash else ""),
        append_args=repr(list(recipe.payload.append_args)))
    return (LAUNCHER_ENV.substitute(fields)
            + LAUNCHERS[recipe.payload.launcher_style].substitute(fields))


def layer_entries(tree: Path, recipe: Recipe):
    """Tar entries of the payload layer: the tree at PREFIX, the recipe's empty
    directories and the launcher (each parent directory once)."""
    seen: set[str] = set()

    def dirs(path: str, *, self_too: bool):
        parts = path.split("/")
        for i in range(1, len(parts) + (1 if self_too else 0)):
            d = "/".join(parts[:i])
            if d not in seen:
                seen.add(d)
                yield oci.dir_entry(d)

    prefix = recipe.payload.prefix.strip("/")
    yield from dirs(prefix, self_too=True)
    yield from oci._walk(tree, prefix)  # noqa: SLF001 - the same reproducible walk as root=
    yield from dirs(IMPORT_CWD.format(prefix=prefix), self_too=True)
    for d in recipe.payload.dirs:
        yield from dirs(d.strip("/"), self_too=True)
    launcher = recipe.payload.launcher.strip("/")
    yield from dirs(launcher, self_too=False)
    yield oci.file_entry(launcher, launcher_script(recipe).encode(), mode=0o755)
