"""A small HTTP load generator (its own process): ``python -m bench.loadgen``.

Concurrent httpx clients (asyncio, keep-alive) request ``GET {url}/v1/lookup?image=``
cycling over the images in a file, for ``--duration`` seconds or exactly once over the
list (``--once``: the cold pass). Prints one JSON line: requests, errors, seconds,
requests/s, latency percentiles (seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time

import httpx

from .machine import summary


async def main_async(args: argparse.Namespace) -> dict:
    with open(args.images) as fh:  # noqa: ASYNC230 - read once, before any request
        images = [line.strip() for line in fh if line.strip()]
    lat: list[float] = []
    status: dict[int, int] = {}
    errors = 0
    if args.once:
        source = iter(images)
    else:
        source = itertools.cycle(images)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    deadline = time.perf_counter() + args.duration

    async with httpx.AsyncClient(base_url=args.url, limits=limits, headers=headers, timeout=30,
                                 trust_env=False) as client:
        async def worker() -> None:
            nonlocal errors
            for image in source:
                if not args.once and time.perf_counter() > deadline:
                    return
                t = time.perf_counter()
                try:
                    r = await client.get("/v1/lookup", params={"image": image})
                    status[r.status_code] = status.get(r.status_code, 0) + 1
                except httpx.HTTPError:
                    errors += 1
                    continue
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - t0
    return {"requests": len(lat), "errors": errors, "status": status, "seconds": wall,
            "rps": len(lat) / wall if wall else 0.0, "latency_s": summary(lat), "concurrency": args.concurrency}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--once", action="store_true")
    p.add_argument("--api-key")
    args = p.parse_args()
    print(json.dumps(asyncio.run(main_async(args))))


if __name__ == "__main__":
    main()
