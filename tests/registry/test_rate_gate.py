"""The rate-limit gate against the Docker-Hub-like stand-in: what the client sends is
read from the stand-in's own log."""

from __future__ import annotations

import base64
import json
import math
import threading

import pytest

from imagefarm.names.reference import parse
from imagefarm.registry import RegistryClient, load_credentials, ratelimit
from imagefarm.registry.ratelimit import LocalGate, RateLimited, observe
from imagefarm.testing.ratelimited import RateLimitedRegistry

from regkit import push_image, tiny_layers

LIMIT, WINDOW = 5, 2.0


@pytest.fixture
def gate():
    """A fresh process gate per test (what a new batch process starts with)."""
    old = ratelimit.install(LocalGate())
    yield ratelimit.current()
    ratelimit.install(old)


@pytest.fixture
def hub(reg):
    with RateLimitedRegistry(reg.url, limit=LIMIT, window=WINDOW, users={"farm": ("s3cret", 40)}) as h:
        yield h


@pytest.fixture
def image(client, reg, tmp_path):
    ref = parse(f"{reg.host}/namanjain12/tornado_final:{'c' * 40}")
    push_image(client, ref, tiny_layers(tmp_path, "t"))
    return ref


def test_docker_hub_headers_are_read():
    seen = observe(200, {"RateLimit-Limit": "100;w=21600", "RateLimit-Remaining": "0;w=21600"})
    assert (seen.limit, seen.remaining, seen.window, seen.spent, seen.pause()) == (100, 0, 21600.0, True, 21600.0)
    assert observe(200, {"Content-Type": "x"}) is None
    assert observe(429, {"Retry-After": "7"}).pause() == 7.0
    assert observe(429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412470.0).pause() == 10.0
    status = ratelimit.GateStatus("docker.io", "anonymous", 200, 0, 21600, 1000 + 5 * 3600 + 12 * 60)
    assert status.line(now=1000) == ("docker.io: 0 of 200 pulls left, resuming in 5h12m; "
                                     "log in for a higher limit (podman login docker.io)")


def test_threads_share_the_budget_and_wait_out_the_window(rsettings, hub, image, gate):
    ref = image.with_repository(hub.host, image.repository)
    with RegistryClient(rsettings, credentials={}, rate_wait=math.inf) as c:
        threads = [threading.Thread(target=lambda: [c.resolve(ref) for _ in range(3)]) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    hits = sorted(hub.counted(), key=lambda h: h.t)
    assert len(hits) == 12 and [h for h in hits if h.status == 429] == []
    assert hub.max_in_window() <= LIMIT
    spent = [(a, b) for a, b in zip(hits, hits[1:]) if a.remaining == 0]
    assert len(spent) >= 2 and all(b.t - a.t >= WINDOW for a, b in spent)


def test_a_caller_that_will_not_wait_is_told_when(rsettings, hub, image, gate):
    ref = image.with_repository(hub.host, image.repository)
    with RegistryClient(rsettings, credentials={}, rate_wait=0.2) as c:
        for _ in range(LIMIT):
            c.resolve(ref)
        with pytest.raises(RateLimited, match=rf"{hub.host}: 0 of {LIMIT} pulls left, resuming in \ds; "
                                              "log in for a higher limit") as exc:
            c.resolve(ref)
    assert exc.value.status.account == "anonymous" and exc.value.until > 0
    assert len(hub.counted()) == LIMIT  # the refused call sent nothing


def test_head_is_not_counted_and_a_known_manifest_costs_no_pull(rsettings, hub, image, gate):
    ref = image.with_repository(hub.host, image.repository)
    with RegistryClient(rsettings, credentials={}) as c:
        first = c.resolve(ref, head_first=True)
        again = c.resolve(ref, head_first=True)
    assert first.digest == again.digest
    assert len(hub.counted()) == 1
    assert [h.method for h in hub.log if "/manifests/" in h.path] == ["HEAD", "GET", "HEAD"]


def test_credentials_from_the_auth_file_raise_the_limit(rsettings, hub, image, gate, tmp_path):
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {hub.host: {"auth": base64.b64encode(b"farm:s3cret").decode()}}}))
    ref = image.with_repository(hub.host, image.repository)
    with RegistryClient(rsettings, credentials=load_credentials(auth), rate_wait=0.2) as c:
        assert c.account(hub.host) == "farm"
        for _ in range(3 * LIMIT):
            c.resolve(ref)
    assert {h.account for h in hub.counted()} == {"farm"} and len(hub.counted()) == 3 * LIMIT
    [status] = gate.status()
    assert (status.account, status.limit, status.remaining) == ("farm", 40, 40 - 3 * LIMIT)
    assert "(account farm)" in status.line() and "log in" not in status.line()


def test_copies_from_one_source_are_capped(rsettings, hub, reg, client, gate, tmp_path):
    """Six bases' blobs copied by six threads; the stand-in's log shows at most
    ``copies_per_source`` streams at once, and each blob fetched exactly once."""
    from concurrent.futures import ThreadPoolExecutor

    from imagefarm import oci
    from imagefarm.derive.blobs import BlobPlacer

    blobs = [bytes([i]) * 3_000_000 for i in range(6)]
    src = parse(f"{reg.host}/cap/src:1")
    for b in blobs:
        client.upload_blob(src, oci.sha256_digest(b), b)
    descs = [oci.Descriptor(oci.OCI_LAYER_GZIP, oci.sha256_digest(b), len(b)) for b in blobs]
    settings = type(rsettings)(**{**rsettings.model_dump(), "copies_per_source": 2})
    with RegistryClient(settings, credentials={}) as c:
        placer = BlobPlacer(c)
        via = src.with_repository(hub.host, src.repository)
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda i: placer.ensure(parse(f"{reg.host}/cap/dst{i}:1"), descs[i], source=via),
                          range(6)))
        for i, d in enumerate(descs):
            assert c.blob_exists(parse(f"{reg.host}/cap/dst{i}:1"), d.digest)
    gets = [h for h in hub.log if h.method == "GET" and "/blobs/" in h.path]
    assert sorted(h.path.rsplit("/", 1)[1] for h in gets) == sorted(d.digest for d in descs)
    assert hub.max_concurrent() <= 2
