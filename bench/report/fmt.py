"""The report's number formatting and the targets it checks figures against."""

from __future__ import annotations

import math
from typing import Any

TARGET_DERIVE_RATE = 50.0
TARGET_RATIO = 250.0
TARGET_SUBSET_S = 120.0
TARGET_OVERHEAD_S = 0.1
TARGET_LOOKUP_RPS = 5000.0
TARGET_LOOKUP_P99_MS = 5.0


def mb(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    if abs(n) >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if abs(n) >= 1e6:
        return f"{n / 1e6:.1f} MB"
    if abs(n) >= 1e3:
        return f"{n / 1e3:.1f} kB"
    return f"{n:.0f} B"


def sec(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x < 0.001:
        return f"{x * 1e6:.1f} µs"
    if x < 0.01:
        return f"{x * 1000:.2f} ms"
    if x < 1:
        return f"{x * 1000:.0f} ms"
    return f"{x:.2f} s"


def num(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}"


def load(la: Any) -> str:
    """'a → b' of the 1-minute load averages of [start, end] pairs."""
    try:
        if isinstance(la[0], list):
            return f"{la[0][0]:.2f} → {la[1][0]:.2f}"
        return f"{la[0]:.2f}"
    except (TypeError, IndexError, KeyError):
        return "–"


def ok(flag: bool | None) -> str:
    return "–" if flag is None else ("met" if flag else "**not met**")
