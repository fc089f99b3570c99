"""Lookup: base -> prebuilt, in process (``Lookup.resolve``) and over HTTP (the real
``imagefarm serve-lookup``: FastAPI under uvicorn, one process), warm and cold.

cold: every base asked once of a fresh ``Lookup`` / a freshly started service (each
answer costs registry round trips: tag list, manifest, verification record); warm: the
same bases asked again and again for ``lookup_seconds``. The HTTP load comes from
``bench.loadgen`` (concurrent httpx clients, keep-alive) in its own process; ``ab``
(one URL, C client) is a second opinion where installed. Client and server share the
machine's cores.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from imagefarm.serve.lookup import Lookup

from .context import Bench, free_port, python
from .derive import fast_run
from .machine import loadavg, summary


def _prefix(b: Bench, bases: list[str]) -> str:
    if b.notes.get("lookup_prefix"):
        return b.notes["lookup_prefix"]
    reg = b.registry()
    b.seed_payload(reg, "prebuilt-lookup")
    b.log(f"lookup: deriving {len(bases)} bases into prebuilt-lookup")
    fast_run(b, bases, f"{reg.host}/prebuilt-lookup", threads=8)
    b.notes["lookup_prefix"] = f"{reg.host}/prebuilt-lookup"
    return b.notes["lookup_prefix"]


def _in_process(b: Bench, prefix: str, bases: list[str]) -> dict[str, Any]:
    lk = Lookup(b.settings(to=prefix))
    try:
        cold = []
        t0 = time.perf_counter()
        for x in bases:
            t = time.perf_counter()
            hit = lk.resolve(x)
            cold.append(time.perf_counter() - t)
            if hit is None:
                raise RuntimeError(f"lookup found no prebuilt image for {x} under {prefix}")
        cold_wall = time.perf_counter() - t0
        warm = []
        n = len(bases)
        i = 0
        t0 = time.perf_counter()
        end = t0 + b.plan.lookup_seconds
        while True:
            t = time.perf_counter()
            lk.resolve(bases[i % n])
            t2 = time.perf_counter()
            warm.append(t2 - t)
            i += 1
            if t2 > end:
                break
        warm_wall = time.perf_counter() - t0
    finally:
        lk.close()
    return {"cold": {"requests": len(cold), "seconds": cold_wall, "rps": len(cold) / cold_wall,
                     "latency_s": summary(cold)},
            "warm": {"requests": len(warm), "seconds": warm_wall, "rps": len(warm) / warm_wall,
                     "latency_s": summary(warm)}}


def _loadgen(b: Bench, url: str, images: Path, key: str, concurrency: int, duration: float,
             once: bool) -> dict[str, Any]:
    argv = [python(), "-m", "bench.loadgen", "--url", url, "--images", str(images), "--concurrency",
            str(concurrency), "--duration", str(duration), "--api-key", key] + (["--once"] if once else [])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 300,
                         cwd=Path(__file__).resolve().parent.parent, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    bad = {k: v for k, v in res["status"].items() if k != "200"}
    if bad or res["errors"]:
        raise RuntimeError(f"{url}: answers other than 200 ({bad}, {res['errors']} transport errors): "
                           "the figures would not be lookups")
    return res


def _ab(url: str, key: str, concurrency: int, duration: float) -> dict[str, Any] | None:
    exe = shutil.which("ab")
    if not exe:
        return None
    out = subprocess.run([exe, "-q", "-k", "-c", str(concurrency), "-t", str(int(duration)), "-n", "10000000",
                          "-H", f"X-API-Key: {key}", url], capture_output=True, text=True,
                         timeout=duration + 120, check=False)
    text = out.stdout
    rps = re.search(r"Requests per second:\s+([\d.]+)", text)
    p99 = re.search(r"^\s*99%\s+(\d+)", text, re.MULTILINE)
    p50 = re.search(r"^\s*50%\s+(\d+)", text, re.MULTILINE)
    failed = re.search(r"Failed requests:\s+(\d+)", text)
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", text)
    done = re.search(r"Complete requests:\s+(\d+)", text)
    if not rps:
        return {"error": (out.stderr or text)[-500:]}
    if non2xx and int(non2xx.group(1)):
        return {"error": f"{non2xx.group(1)} non-2xx answers: not lookups"}
    return {"rps": float(rps.group(1)), "p50_ms": int(p50.group(1)) if p50 else None,
            "p99_ms": int(p99.group(1)) if p99 else None, "failed": int(failed.group(1)) if failed else 0,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0, "requests": int(done.group(1)) if done else 0,
            "concurrency": concurrency, "note": "ab's percentiles are whole milliseconds"}


def run_lookup(b: Bench) -> dict[str, Any]:
    bases = b.small_set()
    prefix = _prefix(b, bases)
    b.check_recipe_stable()
    load0 = loadavg()
    b.log(f"lookup: in process over {len(bases)} bases")
    inproc = _in_process(b, prefix, bases)
    b.log(f"  warm {inproc['warm']['rps']:.0f}/s p99 {inproc['warm']['latency_s']['p99'] * 1e3:.3f} ms; "
          f"cold {inproc['cold']['rps']:.0f}/s")
    port, key = free_port(), secrets.token_urlsafe(16)
    exe = str(Path(sys.executable).parent / "imagefarm")
    proc = b.spawn("lookup", [exe, "serve-lookup", "--port", str(port), "--to", prefix],
                   env={"IMAGEFARM_LOOKUP_API_KEY": key, "IMAGEFARM_STATE_DIR": str(b.state_dir)})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(b, proc, url + "/healthz", "lookup.log")
        images = b.dataset_file(bases, "lookup-images.txt")
        c = b.plan.lookup_concurrency
        b.log(f"lookup: HTTP cold pass ({len(bases)} distinct bases once, {c} clients)")
        cold = _loadgen(b, url, images, key, c, 0, once=True)
        b.log(f"lookup: HTTP warm, {b.plan.lookup_seconds:g}s, {c} clients")
        warm = _loadgen(b, url, images, key, c, b.plan.lookup_seconds, once=False)
        b.log(f"  warm {warm['rps']:.0f}/s p99 {warm['latency_s']['p99'] * 1e3:.1f} ms")
        ab = _ab(f"{url}/v1/lookup?image={bases[0]}", key, c, b.plan.lookup_seconds)
    finally:
        b.stop_proc(proc)
    floor = _floor(b, images, c)
    return {"bases": len(bases), "prefix": prefix, "in_process": inproc,
            "http": {"cold": cold, "warm": warm, "ab": ab}, "floor": floor, "loadavg": [load0, loadavg()]}


def _floor(b: Bench, images: Path, c: int) -> dict[str, Any]:
    """The same load against an almost empty FastAPI app (bench.floor): the framework's share."""
    port = free_port()
    proc = b.spawn("floor", [python(), "-m", "bench.floor", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(b, proc, url + "/healthz", "floor.log")
        b.log(f"lookup: calibration, an empty FastAPI endpoint, {b.plan.lookup_seconds:g}s, {c} clients")
        warm = _loadgen(b, url, images, "x", c, b.plan.lookup_seconds, once=False)
        ab = _ab(f"{url}/v1/lookup?image=x", "x", c, b.plan.lookup_seconds)
    finally:
        b.stop_proc(proc)
    return {"httpx": warm, "ab": ab}


def _wait_http(b: Bench, proc, url: str, log_name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer:\n" + b.log_tail(log_name))
        time.sleep(0.1)
