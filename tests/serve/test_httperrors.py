"""``install_error_handlers``: the one mapping both servers answer errors with. The
runtime server's five handlers (runtime/app.py) answer the same, case for case: the
cases below are theirs (429 with Retry-After 10, registry failures 502 with Retry-After 5
and the registry named, the rest their own status without headers)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from imagefarm.errors import ConfigError, ImageRefused, InvalidReference, NotFound, RegistryUnreachable
from imagefarm.runtime.errors import BackendError, CapacityFull, UnknownRuntime
from imagefarm.serve.httperrors import install_error_handlers

CASES = [
    (InvalidReference("invalid image reference 'A B'"), 400, None, "invalid image reference 'A B'"),
    (ImageRefused("stale recipe"), 409, None, "stale recipe"),
    (UnknownRuntime("no runtime r1"), 404, None, "no runtime r1"),
    (CapacityFull("every node is full"), 429, "10", "every node is full"),
    (BackendError("podman failed"), 502, None, "podman failed"),
    (RegistryUnreachable("127.0.0.1:1 refused"), 502, "5", "the registry could not be asked for a prebuilt image: "
                                                            "127.0.0.1:1 refused"),
    (NotFound("manifest unknown"), 502, "5", "the registry could not be asked for a prebuilt image: manifest unknown"),
    (ConfigError("bad"), 500, None, "bad"),
]


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/raise/{i}")
    def boom(i: int):
        raise CASES[i][0]

    with TestClient(app) as c:
        yield c


@pytest.mark.parametrize("i", range(len(CASES)), ids=[type(c[0]).__name__ for c in CASES])
def test_each_error_has_its_status_detail_and_retry_after(client, i):
    exc, status, retry, detail = CASES[i]
    r = client.get(f"/raise/{i}")
    assert (r.status_code, r.headers.get("Retry-After"), r.json()) == (status, retry, {"detail": detail})


def test_the_lookup_api_says_which_registry_failed():
    from imagefarm.serve.httperrors import error_response

    r = error_response(RegistryUnreachable("refused"), registry_context="target registry")
    assert r.status_code == 502 and r.body == b'{"detail":"target registry: refused"}'
