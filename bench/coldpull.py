"""Cold payload pulls: what a node pays the first time it needs a recipe's payload.

For each (recipe, layout): the payload published as its one-layer image (``payload
push``) in a loopback docker-registry, then ``podman pull`` into empty, private storage
(the project's own containers.conf/storage.conf, overlay as the tests use it), ``rounds``
times. The same blob is also timed in parts, each alone: download (HTTP GET to
/dev/null), decompress (the layer's codec to /dev/null) and unpack (``tar -x`` of the
uncompressed stream into a directory on the same filesystem as podman's storage).
Beside the pull: files and bytes of the layer, and the boot (``podman run`` of the
payload's launcher to ``/alive``) from that storage.

Run alone: ``python -m bench.coldpull [--recipes default,v0] [--layouts tree,zip] [--rounds 2]``
(prints JSON; ``bench`` runs it as section ``coldpull``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from imagefarm import oci
from imagefarm.host.containers import run
from imagefarm.host.services import Registry, free_port
from imagefarm.payload import build_payload
from imagefarm.payload.recipe import load_recipe
from imagefarm.payload.remote import push
from imagefarm.registry import RegistryClient
from imagefarm.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def _count(root: Path) -> dict[str, int]:
    entries = files = 0
    for _dirpath, dirnames, names in os.walk(root):
        entries += len(dirnames) + len(names)
        files += len(names)
    return {"entries": entries, "files": files}


def _decompress_cmd(media_type: str) -> list[str]:
    return ["zstd", "-dc"] if media_type.endswith("zstd") else ["gzip", "-dc"]


def _timed(argv: list[str], **kw: Any) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, **kw)
    return time.monotonic() - t0


def _parts(url: str, layer: oci.Layer, scratch: Path) -> dict[str, float]:
    t0 = time.monotonic()
    with httpx.stream("GET", url, timeout=300) as r:
        r.raise_for_status()
        for _ in r.iter_bytes(1 << 20):
            pass
    download = time.monotonic() - t0
    dec = _decompress_cmd(layer.media_type)
    decompress = _timed(dec + [str(layer.path)], stdout=subprocess.DEVNULL)
    raw = scratch / "layer.tar"
    subprocess.run(dec + [str(layer.path)], check=True, stdout=open(raw, "wb"))
    out = scratch / "unpacked"
    out.mkdir()
    subprocess.run(["sync"], check=False)
    unpack = _timed(["tar", "-xf", str(raw), "-C", str(out)])
    counted = _count(out)
    size = raw.stat().st_size
    shutil.rmtree(out)
    raw.unlink()
    return {**counted, "uncompressed_bytes": size, "download_s": round(download, 2),
            "decompress_s": round(decompress, 2), "unpack_s": round(unpack, 2)}


def _cold_pull(ref: str, work: Path, cache_dir: Path, i: int) -> tuple[float, Settings]:
    s = Settings(state_dir=work / f"state-{i}", cache_dir=cache_dir)
    subprocess.run(["sync"], check=False)
    t0 = time.monotonic()
    run(s, ["podman", "pull", "-q", ref], timeout=900)
    return time.monotonic() - t0, s


def _boot(s: Settings, ref: str, recipe: Any) -> float | None:
    """podman run of the payload's own command -> first 2xx on the recipe's ready path."""
    port = free_port()
    cmd = list(recipe.command)
    # the V0 command's server port is a positional argument; the default's --port N
    cmd = [str(port) if c == "60000" else c for c in cmd]
    t0 = time.monotonic()
    cid = run(s, ["podman", "run", "-d", "--network=host", "--tmpfs", "/tmp", "-e", "OPENHANDS_SUPPRESS_BANNER=1",
                  "--entrypoint", cmd[0], ref, *cmd[1:]], timeout=300).stdout.strip()
    try:
        deadline = t0 + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}{recipe.ready[0]}", timeout=2).status_code < 300:
                    return round(time.monotonic() - t0, 2)
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        print(run(s, ["podman", "logs", cid], check=False, timeout=60).stderr[-2000:], file=sys.stderr)
        return None
    finally:
        run(s, ["podman", "rm", "-f", "-t", "0", cid], check=False, timeout=120)


def measure(recipes: list[str], layouts: list[str], rounds: int = 2, log=print, *,
            parts: bool = True) -> dict[str, Any]:
    base = Settings()
    out: dict[str, Any] = {"rounds": rounds, "rows": []}
    work = Path(tempfile.mkdtemp(prefix="imagefarm-coldpull-", dir=str(base.cache_dir.parent)
                                 if Path(base.cache_dir).parent.is_dir() else None))
    try:
        with Registry.create(work / "registry") as reg, RegistryClient(Settings(cache_dir=base.cache_dir)) as client:
            for name in recipes:
                for layout in layouts:
                    recipe = load_recipe(name, REPO / "recipes")
                    recipe = recipe.model_copy(update={"payload": recipe.payload.model_copy(update={"layout": layout})})
                    log(f"coldpull: {name}/{layout}: payload ...")
                    p = build_payload(base, recipe, log=log)
                    ref, _digest, _sent = push(client, p, f"{reg.host}/bench")
                    url = f"{reg.url}/v2/{ref.repository}/blobs/{p.layer.digest}"
                    split = _parts(url, p.layer, work) if parts else {}
                    pulls, boots = [], []
                    for i in range(rounds):
                        secs, s = _cold_pull(str(ref), work, base.cache_dir, len(out["rows"]) * 10 + i)
                        pulls.append(round(secs, 2))
                        if i == 0:
                            boots.append(_boot(s, str(ref), recipe) if parts else None)
                        run(s, ["podman", "rm", "--all", "--force", "--time", "0"], check=False, timeout=120)
                        run(s, ["podman", "system", "reset", "--force"], check=False, timeout=600)
                        shutil.rmtree(s.state_dir, ignore_errors=True)
                    row = {"recipe": name, "layout": layout, "layer_digest": p.layer.digest,
                           "media_type": p.layer.media_type, "compressed_bytes": p.layer.size, **split,
                           "pulls_s": pulls, "pull_s": statistics.median(pulls), "boot_s": boots[0]}
                    log(f"coldpull: {json.dumps(row)}")
                    out["rows"].append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def run_coldpull(bench: Any) -> dict[str, Any]:
    """The bench section: both recipes, both layouts, interleaved (1 round with --quick)."""
    return measure(["default", "v0"], ["tree", "zip"], rounds=1 if bench.plan.quick else 2,
                   log=lambda m: print(f"[bench] {m}", flush=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default="default,v0")
    ap.add_argument("--layouts", default="tree,zip")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pull-only", action="store_true", help="only the cold pulls (no parts, no boot)")
    a = ap.parse_args(argv)
    res = measure(a.recipes.split(","), a.layouts.split(","), a.rounds,
                  log=lambda m: print(m, file=sys.stderr, flush=True), parts=not a.pull_only)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
