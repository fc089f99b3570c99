"""The benchmark report's sections are found from their own files and render in order;
a failed section says so instead of showing figures. (Plots need matplotlib, the bench
extra: not drawn here.)"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from bench.report import render
from bench.report.sections import sections

RESULTS = json.loads((Path(__file__).resolve().parents[2] / "docs/bench/results.json").read_text())


def test_every_section_module_is_found_once_in_document_order():
    found = sections()
    assert [s.order for s in found] == sorted(s.order for s in found)
    names = {s.name for s in found}
    assert len(names) == len(found)
    assert {"derive", "scale", "farm", "copy", "runtime", "lookup", "ratelimit", "fleet", "relayer", "v0"} <= names


def test_render_shows_each_result_and_says_which_failed(tmp_path):
    results = copy.deepcopy(RESULTS)
    results["sections"]["runtime"].pop("result", None)
    results["sections"]["runtime"]["error"] = "podman failed: no runc"
    render(results, tmp_path, plots=False)
    doc = (tmp_path / "BENCHMARKS.md").read_text()
    titled = [s for s in sections() if s.title and s.name in results["sections"]]
    at = [doc.index(s.title + "\n") for s in titled]
    assert at == sorted(at) and len(at) >= 5
    assert "**Not measured: the runtime section failed in this run** — `podman failed: no runc`" in doc
    assert "| runtime `/start` → ready | agent server's own boot + ≤ 0.1 s | **pending**" in doc
    assert "![throughput](bench/throughput.png)" in doc
