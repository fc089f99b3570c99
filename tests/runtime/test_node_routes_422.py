"""The node and fleet routes read bodies through ``read_body``: a refused body is a 422
that says where and why, never the values it refused (environment values included)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from imagefarm.runtime.frontapi import NodeReport
from imagefarm.runtime.node import NodeStart, read_body
from imagefarm.serve.apikey import HEADER

KEY = "k" * 32
SECRET = "tok-0123456789-very-secret"


def _app(model):
    app = FastAPI()

    @app.post("/x")
    async def x(request: Request):
        await read_body(request, KEY, model)
        return {}

    return TestClient(app)


@pytest.mark.parametrize("model,body", [
    (NodeStart, {"request": {"image": "x", "environment": {"bad name": SECRET, "OK": SECRET}},
                 "runtime_id": SECRET, "prebuilt": SECRET}),
    (NodeReport, {"node_id": SECRET + "!", "boot": "b", "url": "ftp://" + SECRET, "address": "a", "slots": 10 ** 9}),
])
def test_a_refused_body_is_never_echoed(model, body):
    c = _app(model)
    assert c.post("/x", json=body).status_code == 401  # the key first, nothing read
    r = c.post("/x", json=body, headers={HEADER: KEY})
    assert r.status_code == 422 and r.json()["detail"], r.text
    assert SECRET not in r.text and "input" not in r.text, r.text
