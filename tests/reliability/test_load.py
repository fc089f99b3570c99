"""Load: 1,000 lookups from 50 concurrent HTTP clients against the real lookup API and
the real registry all complete with the right answer and no error. (Throughput and
latency are measured by bench/, never asserted here.)"""

from __future__ import annotations

import asyncio
import collections

import httpx

N_CLIENTS = 50
PER_CLIENT = 20
KEY = "load-test-key"


def test_thousand_concurrent_lookups(lookup_api, registry, fixtures, derive_to):
    to = f"{registry.host}/rel-load"
    bases = [b.ref for b in fixtures.r2e_set(6)]
    built = {b: derive_to(b, to) for b in bases[:4]}  # 4 hits, 2 misses
    # a short hit TTL so that the registry is asked again while the load runs
    api = lookup_api(to, api_key=KEY, ttl=0.5, miss_ttl=0)
    errors: list[str] = []
    answers: collections.Counter = collections.Counter()

    async def client(i: int) -> None:
        async with httpx.AsyncClient(base_url=api.url, headers={"X-API-Key": KEY},
                                     timeout=httpx.Timeout(300.0)) as c:
            for j in range(PER_CLIENT):
                base = bases[(i + j) % len(bases)]
                try:
                    r = await c.get("/v1/lookup", params={"image": base})
                except httpx.HTTPError as exc:
                    errors.append(f"{base}: {type(exc).__name__}: {exc}")
                    continue
                if base in built:
                    ok = r.status_code == 200 and r.json()["digest"] == built[base].digest
                else:
                    ok = r.status_code == 404 and r.json()["base"] == base
                answers[r.status_code] += 1
                if not ok:
                    errors.append(f"{base}: {r.status_code} {r.text[:200]}")

    async def main() -> None:
        await asyncio.gather(*(client(i) for i in range(N_CLIENTS)))

    asyncio.run(main())
    assert not errors, f"{len(errors)} errors, first: {errors[:5]}"
    assert sum(answers.values()) == N_CLIENTS * PER_CLIENT
    assert set(answers) == {200, 404}
    metrics = httpx.get(f"{api.url}/metrics", timeout=60).text
    assert 'imagefarm_lookup_requests_total{result="error"}' not in metrics
