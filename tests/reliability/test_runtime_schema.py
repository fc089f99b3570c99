"""Property-based requests generated from the runtime server's own OpenAPI document
(schemathesis): no server error, and nothing left running afterwards. The lookup API's
document gets the same treatment in tests/serve/test_lookup.py.

``/build`` and ``/build_status`` answer 501 on purpose (a prebuilt-only server refuses
to build, with the command that would build): they are checked for exactly that and
left out of the "no 5xx" run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from rtkit import API_KEY, our_containers


def test_schemathesis_runtime_api_finds_no_server_error(server_factory, prebuilt, rt_settings, tmp_path):
    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    with server_factory() as srv:
        proc = subprocess.run([exe, "run", f"{srv.url}/openapi.json", "--checks", "not_a_server_error",
                               "--max-examples", "25", "-H", f"X-API-Key: {API_KEY}",
                               "--phases", "examples,coverage,fuzzing",
                               "--exclude-path", "/build", "--exclude-path", "/build_status"],
                              capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        m = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
        assert m and int(m.group(1)) > 50 and m.group(1) == m.group(2), proc.stdout[-2000:]
        h = {"X-API-Key": API_KEY}
        for method, path in (("POST", "/build"), ("GET", "/build_status")):
            r = httpx.request(method, srv.url + path, headers=h, timeout=60)
            assert r.status_code == 501 and "imagefarm derive" in r.json()["detail"], r.text
    assert our_containers(rt_settings, srv.manager.server_id) == []
