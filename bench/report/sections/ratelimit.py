"""Section: A batch from a rate-limited registry: what ``--plan`` said against what the run moved."""

from __future__ import annotations

from typing import Any

from ..fmt import load, mb, sec
from . import Context, Section


def body(rl: dict[str, Any], ctx: Context) -> list[str]:
    """Section 5: a batch from a rate-limited registry, planned vs moved."""
    L: list[str] = []
    w = L.append
    pl, rn, np_ = rl["plan"], rl["run"], rl["run_without_plan"]
    w(f"{rl['bases']} bases ({rl['realistic']} realistic, {rl['small']} small) in registry A behind the "
      f"Docker-Hub-like stand-in (`imagefarm.testing.ratelimited`: {rl['limit']} manifest GETs per "
      f"{rl['window']:g} s window, sliding, 429 past it; HEAD and blobs not counted). *Planned*: "
      "`make_plan` (what `imagefarm prebuild --plan` prints); *moved*: the stand-in's own log during the "
      "run that followed (layer blobs served, counted requests), and registry B's access log (blob bytes "
      "that landed). The plan reads each manifest once (HEAD first, GET only for bases not done) and "
      "keeps it by digest, so the run reads tags with HEAD and spends no pull.")
    w("")
    w("| | layer blobs | layer bytes | counted requests (pulls) | 429 answers | time |")
    w("|---|---|---|---|---|---|")
    w(f"| planned (`--plan`) | {pl['layers']} | {mb(pl['layer_bytes'])} | {pl['pulls']} spent by the plan "
      f"(stand-in log: {pl['pulls_in_log']}), 0 more for the run | – | plan took {sec(pl['seconds'])}; "
      f"estimate {sec(pl['estimate_s'])} at {mb(pl['bandwidth'])}/s |")
    w(f"| moved by the run | {rn['layers']} | {mb(rn['layer_bytes'])} (B received {mb(rn['pushed_bytes'])} "
      f"incl. payload and configs) | {rn['pulls']} | {rn['refused_429']} | {sec(rn['seconds'])}, derived "
      f"{rn['derived']}, failed {rn['failed']} |")
    w(f"| run with no plan first (empty registry C) | {np_['layers']} | {mb(np_['layer_bytes'])} | "
      f"{np_['pulls']} | {np_['refused_429']} | {sec(np_['seconds'])} (the budget alone needs ≥ "
      f"{sec(np_['min_seconds_by_budget'])}), {np_['pauses']} pauses, derived {np_['derived']}, failed "
      f"{np_['failed']} |")
    w("")
    w("Before this change (issue #17, measured by the issue's author against a stand-in allowing 10 "
      "manifest GETs per 60 s): 40 bases gave 24 derived and 16 failed after 125 s, with more than 700 "
      f"429 answers. Load average {load(rl['loadavg'])}.")
    w("")
    return L


SECTION = Section(
    "ratelimit",
    5,
    body,
    title="## 5. A batch from a rate-limited registry: `--plan` vs what the run moves",
)
