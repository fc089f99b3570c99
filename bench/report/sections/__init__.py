"""The report's sections: one module each in this package, each defining ``SECTION``.

A new section is a new file here (no list to edit): its ``body`` renders the section's
figures from its result, ``targets`` adds rows to the targets table, ``plot`` writes its
PNGs, ``order`` places it in the document. Modules are found by ``sections()``.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Context:
    """What a section may read beyond its own result: the whole run."""

    results: dict[str, Any]
    machine: dict[str, Any] = field(init=False)
    sections: dict[str, Any] = field(init=False)  #: name -> entry (command, when, result or error)
    res: dict[str, Any] = field(init=False)       #: name -> result, for the sections that produced one

    def __post_init__(self) -> None:
        S = self.results["sections"]
        object.__setattr__(self, "machine", self.results["machine"])
        object.__setattr__(self, "sections", S)
        object.__setattr__(self, "res", {k: v.get("result") for k, v in S.items() if v.get("result")})

    @property
    def when(self) -> str:
        return self.machine["when"]


@dataclass(frozen=True)
class Section:
    name: str                                            #: its key in results.json's ``sections``
    order: float                                         #: place in the document
    body: Callable[[dict[str, Any], Context], list[str]]  #: markdown lines from its result
    title: str | None = None
    pending: tuple[str, ...] = ()                        #: lines shown before the error when it failed
    targets: Callable[[Context], list[str]] | None = None  #: rows of the targets table
    target_order: float | None = None                    #: place of those rows (default ``order``)
    plot: Callable[[Context, Path], None] | None = None  #: writes its PNGs into the given folder
    tail: Callable[[Context], list[str]] | None = None   #: lines after it whether or not it ran


def sections() -> list[Section]:
    """Every section module's ``SECTION``, in document order."""
    found = []
    for mod in pkgutil.iter_modules(__path__):
        found.append(importlib.import_module(f"{__name__}.{mod.name}").SECTION)
    names = [s.name for s in found]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"two report sections claim {', '.join(dupes)}")
    return sorted(found, key=lambda s: s.order)
