"""Section: starts by what the node holds (warm sandboxes, payloads at join); figures in bench/runtime.py."""

from __future__ import annotations

from typing import Any

from . import Context, Section


def body(r: dict[str, Any], ctx: Context) -> list[str]:
    from bench.runtime import render_starts

    return render_starts(r)


SECTION = Section(
    "starts",
    9,
    body,
    title="## 9. Starts by what the node holds: warm sandboxes, payloads at join",
)
