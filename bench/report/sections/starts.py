"""Section: starts by what the node holds (warm sandboxes, payloads at join); figures in bench/runtime.py."""

from __future__ import annotations

from typing import Any

from . import Context, Section


def body(r: dict[str, Any], ctx: Context) -> list[str]:
    from bench.runtime import render_starts

    return render_starts(r)


def tail(ctx: Context) -> list[str]:
    if ctx.res.get("starts"):
        return []
    return ["**Not measured yet.** `.venv/bin/python -m bench --quick --only starts` was stopped after "
            "round 1 of 3 of the default recipe (load average 24 on 2 cores, 2026-12-03; it would not have "
            "finished in time): nothing from it is shown here.", ""]


SECTION = Section(
    "starts",
    9,
    body,
    title="## 9. Starts by what the node holds: warm sandboxes, payloads at join",
    tail=tail,
)
