"""The payload layer: the tree at the recipe's prefix plus the launcher, whose program is
made of package data files filled in per recipe: ``launcher_env.py.tmpl`` (environment,
HOME, private tools on PATH) then, by ``payload.launcher_style``, ``launcher.py.tmpl``
(call the server's function) or ``micromamba.py.tmpl`` (answer the V0 command)."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import zipfile
from collections.abc import Iterator
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

#: how ``layer_entries`` lays a tree out; a cached layer of another format is rebuilt from
#: its (cached) tree, so a change here never ships an old layout under the recipe's digest
LAYER_FORMAT = 2

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


#: the zip of the ``zip`` layout and the .pth that puts it on sys.path (site.py reads
#: .pth lines relative to site-packages, in -I mode too)
SITE_ZIP = "imagefarm-packages.zip"
#: site.py reads .pth files in name order: this one sorts first, so the zip is on sys.path
#: before another .pth imports from it (setuptools' distutils-precedence.pth imports
#: _distutils_hack, which the zip holds)
SITE_PTH = "00-imagefarm-packages.pth"
#: a package whose code says one of these may read its own files from disk
_READS_FILES = re.compile(rb"__file__|__path__\[0\]|resource_filename|pkg_resources|importlib[._]resources|get_data\(")
#: files that are code or documentation, never read at run time as data
_CODE = (".py", ".pyc", ".pyi", "py.typed", ".md", ".rst")
_EXT = re.compile(r"\.so(\.|$)")


def _unit_kind(path: Path) -> str:
    """``zip`` or ``file`` for one top-level package or module of site-packages.

    Files: extension modules (zipimport loads only Python), and packages that carry data
    and whose code reaches for its own files (``__file__``, pkg_resources,
    importlib.resources: a zip path may not open). Everything else goes into the zip."""
    if path.is_file():
        if path.suffix != ".py" or _READS_FILES.search(path.read_bytes()):
            return "file"
        return "zip"
    has_data = reads = False
    for dirpath, _dirs, names in os.walk(path):
        for n in names:
            if _EXT.search(n):
                return "file"
            if n.endswith(".py"):
                reads = reads or bool(_READS_FILES.search(Path(dirpath, n).read_bytes()))
            elif not n.endswith(_CODE):
                has_data = True
    return "file" if has_data and reads else "zip"


def zip_units(site: Path, prune: tuple[str, ...] = ()) -> list[str]:
    """The site-packages entries (relative paths) the ``zip`` layout moves into the zip:
    package metadata, pure packages and modules; namespace packages (no ``__init__.py``)
    are decided per portion, since a namespace spans the directory and the zip."""
    out: list[str] = []

    def visit(rel: str) -> None:
        p = site / rel
        if rel in prune or p.is_symlink() or p.name == "__pycache__":
            return
        if p.is_dir() and rel.endswith((".dist-info", ".egg-info")):
            out.append(rel)
        elif p.is_dir() and not (p / "__init__.py").exists():
            if any(n.endswith(".py") for _d, _s, ns in os.walk(p) for n in ns):
                for child in sorted(os.listdir(p)):
                    visit(f"{rel}/{child}")
        elif (p.is_dir() or p.suffix == ".py") and _unit_kind(p) == "zip":
            out.append(rel)

    for name in sorted(os.listdir(site)):
        visit(name)
    return out


def _zip_members(site: Path, rel: str, tag: str) -> Iterator[tuple[str, Path]]:
    """(name in the zip, source) for one unit: each module's ``.py`` and its precompiled
    ``.pyc`` beside it (zipimport reads ``mod.pyc``, not ``__pycache__/``); no ``.pyi``."""
    root = site / rel
    items = [(rel, root)] if root.is_file() else []
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for n in sorted(names):
            items.append((os.path.relpath(os.path.join(dirpath, n), site), Path(dirpath, n)))
    tag = f".{tag}.pyc"
    for name, src in items:
        if name.endswith(".pyi"):
            continue
        yield name, src
        if name.endswith(".py"):
            pyc = src.parent / "__pycache__" / (src.stem + tag)
            if pyc.is_file():
                yield name[:-3] + ".pyc", pyc


def cache_tag(python: str) -> str:
    """The payload interpreter's ``sys.implementation.cache_tag`` (3.13 -> cpython-313)."""
    return "cpython-" + python.replace(".", "")


def write_site_zip(site: Path, units: list[str], out, tag: str) -> None:
    """A reproducible stored zip (sorted, fixed dates and modes, explicit directories);
    ``tag``: the cache tag of the payload's python (its ``__pycache__`` names)."""
    members = sorted(m for u in units for m in _zip_members(site, u, tag))
    dirs = sorted({"/".join(n.split("/")[:i]) + "/" for n, _ in members for i in range(1, n.count("/") + 1)})
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, src in [(d, None) for d in dirs] + members:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system = 3
            info.external_attr = ((0o40755 if src is None else 0o100644) << 16) | (0x10 if src is None else 0)
            zf.writestr(info, b"" if src is None else src.read_bytes())


def layer_entries(tree: Path, recipe: Recipe):
    """Tar entries of the payload layer: the tree at PREFIX (in the ``zip`` layout with
    the pure-Python packages in one zip), the recipe's empty directories and the
    launcher (each parent directory once)."""
    with contextlib.ExitStack() as stack:
        yield from _entries(tree, recipe, stack)


def _entries(tree: Path, recipe: Recipe, stack: contextlib.ExitStack):
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
    site_rel = f"venv/lib/python{recipe.builder.python}/site-packages"
    site = tree / site_rel
    exclude = {f"{site_rel}/{p}" for p in recipe.payload.prune}
    extra = []
    if recipe.payload.layout == "zip":
        units = zip_units(site, recipe.payload.prune)
        exclude |= {f"{site_rel}/{u}" for u in units}
        tag = cache_tag(recipe.builder.python)
        exclude |= {f"{site_rel}/__pycache__/{u[:-3]}.{tag}.pyc" for u in units if u.endswith(".py")}
        fh = stack.enter_context(tempfile.NamedTemporaryFile(prefix=".site-", suffix=".zip"))
        write_site_zip(site, units, fh, tag)
        fh.flush()
        os.chmod(fh.name, 0o644)
        extra = [(f"{prefix}/{site_rel}/{SITE_ZIP}", Path(fh.name), None),
                 oci.file_entry(f"{prefix}/{site_rel}/{SITE_PTH}", f"{SITE_ZIP}\n".encode())]
    walk = oci._walk(tree, prefix, frozenset(exclude))  # noqa: SLF001 - the same reproducible walk as root=
    yield from _with_extra(walk, extra, f"{prefix}/{site_rel}")
    yield from dirs(IMPORT_CWD.format(prefix=prefix), self_too=True)
    for d in recipe.payload.dirs:
        yield from dirs(d.strip("/"), self_too=True)
    launcher = recipe.payload.launcher.strip("/")
    yield from dirs(launcher, self_too=False)
    yield oci.file_entry(launcher, launcher_script(recipe).encode(), mode=0o755)


def _with_extra(walk, extra, where: str):
    """The walk with ``extra`` entries right after the directory ``where``."""
    for entry in walk:
        yield entry
        if entry[0] == where:
            yield from extra
            extra = []
    yield from extra
