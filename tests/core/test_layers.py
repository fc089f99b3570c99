"""The one direction of imports drawn in imagefarm/README.md: no module imports a layer
above its own, and product code never imports ``imagefarm.testing``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: low to high, as drawn in imagefarm/README.md; a package may import its own layer and below
LAYERS = [{"errors"}, {"names", "oci"}, {"settings"}, {"registry", "host", "sign"}, {"derive", "payload"},
          {"farm", "worker"}, {"serve"}, {"runtime"}, {"cli", "demo", "testing"}]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _unit(path: Path) -> str:
    """The layer unit of a source file: its subpackage, top-level module, worker or runtime."""
    rel = path.relative_to(ROOT).parts
    if rel[0] in ("worker", "runtime"):
        return rel[0]
    return rel[1].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, unit) of every imagefarm import, at any depth (lazy imports count too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and (node.module == "imagefarm" or node.module.startswith("imagefarm.")):
            parts = node.module.split(".")
            if len(parts) > 1:
                out.append((node.lineno, parts[1]))
            else:  # from imagefarm import oci, __version__
                out += [(node.lineno, a.name) for a in node.names if a.name in LEVEL]
        elif isinstance(node, ast.ImportFrom) and node.level > 1:
            out.append((node.lineno, "relative import beyond a sibling"))
    return out


def test_imports_point_down_only():
    sources = [p for p in (ROOT / "imagefarm").rglob("*.py") if p.name != "__init__.py" or p.parent.name != "imagefarm"]
    sources += list((ROOT / "worker").glob("*.py")) + list((ROOT / "runtime").glob("*.py"))
    upward = []
    for path in sources:
        unit = _unit(path)
        for line, target in _imports(path):
            if target not in LEVEL or LEVEL[target] > LEVEL[unit]:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({unit}) imports {target}")
            elif target == "testing" and unit != "testing":
                upward.append(f"{path.relative_to(ROOT)}:{line} product code imports imagefarm.testing")
    assert not upward, "\n".join(upward)
