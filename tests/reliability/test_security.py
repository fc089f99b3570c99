"""The lookup API's key: 401 for a missing or wrong key, before any input is looked at;
the key never comes back in a response, a header or a log line (all loggers captured
at DEBUG with access logs on); the comparison is ``hmac.compare_digest``."""

from __future__ import annotations

import hmac
import secrets
import time

import httpx
import pytest

from imagefarm.serve import apikey
from imagefarm.errors import ConfigError

PROTECTED = [("GET", "/v1/lookup", {"params": {"image": "namanjain12/pandas_final:1"}}),
             ("POST", "/v1/lookup", {"json": {"images": ["namanjain12/pandas_final:1"]}}),
             ("POST", "/v1/invalidate", {})]


def _all_text(r: httpx.Response) -> str:
    return r.text + "\n" + "\n".join(f"{k}: {v}" for k, v in r.headers.items())


def test_missing_or_wrong_key_is_401_and_never_echoed(lookup_api, registry):
    key = "expected-" + secrets.token_urlsafe(24)
    api = lookup_api(f"{registry.host}/rel-sec", api_key=key)
    wrong = "sent-" + secrets.token_urlsafe(24)
    attempts = {
        "missing": {},
        "wrong": {"X-API-Key": wrong},
        "prefix of the key": {"X-API-Key": key[:-1]},
        "key plus a byte": {"X-API-Key": key + "x"},
        "empty": {"X-API-Key": ""},
        "other case of header value": {"X-API-Key": key.upper()},
        "in another header": {"Authorization": f"Bearer {key}", "X-Api-Token": wrong},
    }
    for method, path, kw in PROTECTED:
        for case, headers in attempts.items():
            r = httpx.request(method, f"{api.url}{path}", headers=headers, timeout=60, **kw)
            assert r.status_code == 401, (path, case, r.status_code, r.text)
            assert r.headers.get("WWW-Authenticate") == "X-API-Key"
            body = _all_text(r)
            assert key not in body and wrong not in body and key[:-1] not in body, (path, case)
        # with the key: not a 401
        r = httpx.request(method, f"{api.url}{path}", headers={"X-API-Key": key}, timeout=60, **kw)
        assert r.status_code in (200, 404), (path, r.status_code, r.text)
    # bad input is not even parsed without the key (no schema or reference errors leak)
    assert httpx.get(f"{api.url}/v1/lookup", params={"image": "Bad Ref"}, timeout=60).status_code == 401
    assert httpx.post(f"{api.url}/v1/lookup", json={"images": 5}, timeout=60).status_code == 401
    # health, metrics and the OpenAPI document stay open and carry no key
    for path in ("/healthz", "/metrics", "/openapi.json"):
        r = httpx.get(f"{api.url}{path}", timeout=60)
        assert r.status_code == 200 and key not in _all_text(r), path
    logs = api.logs.text
    assert "/v1/lookup" in logs, "the capture saw the access log"  # the capture works ...
    for secret in (key, wrong, key[:-1], key.upper()):
        assert secret not in logs  # ... and no key is in it


def test_key_matches_behaviour(monkeypatch):
    key = secrets.token_urlsafe(32)
    assert apikey.key_matches(key, key)
    for sent in (None, "", key[:-1], key + "a", key[:-1] + ("A" if key[-1] != "A" else "B"), " " + key,
                 key.upper() if key.upper() != key else key.lower()):
        assert not apikey.key_matches(sent, key), sent
    assert not apikey.key_matches("", "")  # an empty key never matches
    assert apikey.key_matches("clé-ünïcode", "clé-ünïcode") and not apikey.key_matches("cle", "clé")
    # the comparison is the constant-time one (observed, not mocked: it still compares)
    seen = []
    real = hmac.compare_digest

    def spy(a, b):
        seen.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(apikey.hmac, "compare_digest", spy)
    assert apikey.key_matches(key, key) and not apikey.key_matches("x" * len(key), key)
    assert seen == [(bytes, bytes), (bytes, bytes)]


def test_key_is_required_unless_auth_is_disabled_explicitly(settings):
    """An empty key would admit anyone sending an empty header; no key at all is no
    longer "auth off": both are refused at start, and only --disable-auth turns it off."""
    from imagefarm.serve.lookup import Lookup
    from imagefarm.serve.lookup_api import create_app

    with pytest.raises(ConfigError, match="empty"):
        apikey.check_key_config("", False)
    with pytest.raises(ConfigError, match="--disable-auth"):
        apikey.check_key_config(None, False)
    with pytest.raises(ConfigError, match="exclude"):
        apikey.check_key_config("k", True)
    assert apikey.check_key_config(None, True) is None
    lk = Lookup(settings)
    try:
        with pytest.raises(ConfigError, match="API key is required"):
            create_app(lk)
        assert create_app(lk, disable_auth=True).state.open_paths >= {"/healthz", "/metrics"}
    finally:
        lk.close()


def test_every_lookup_route_but_health_metrics_and_docs_needs_the_key(lookup_api, registry):
    """Walk the app's own route table: a route added later is covered without editing this test."""
    from imagefarm.serve.apikey import DOC_PATHS

    key = secrets.token_urlsafe(24)
    api = lookup_api(f"{registry.host}/rel-routes", api_key=key)
    assert api.app.state.open_paths == {"/healthz", "/metrics"} | DOC_PATHS
    from rtkit import route_table

    checked = set()
    for template, methods in route_table(api.app.routes):
        path = template.replace("{", "").replace("}", "")
        for method in methods:
            for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": key[:-1]}):
                r = httpx.request(method, api.url + path, headers=headers, json={"images": 5}, timeout=60)
                want = 200 if template in api.app.state.open_paths else 401
                assert r.status_code == want, (method, path, headers, r.status_code)
            checked.add((method, template))
    assert {("GET", "/v1/lookup"), ("POST", "/v1/lookup"), ("POST", "/v1/invalidate")} <= checked
    assert len(checked) >= 9, sorted(checked)


def test_serve_lookup_as_a_user_needs_a_key_refuses_a_gigabyte_at_once(cli_env, registry, tmp_path):
    """`imagefarm serve-lookup` started as a user would: no key is exit 2 naming --disable-auth;
    with a key, an unauthenticated 1 GB POST is a 401 before its body, with RSS counted flat."""
    import os
    import signal
    import subprocess

    from imagefarm.host.services import free_port
    from rtkit import chunked_post, raw_post, rss_bytes
    from tests.conftest import IMAGEFARM

    env = {k: v for k, v in cli_env.items() if k != "IMAGEFARM_LOOKUP_API_KEY"}
    env["IMAGEFARM_TO"] = f"{registry.host}/rel-serve"
    no_key = subprocess.run([IMAGEFARM, "serve-lookup", "--port", str(free_port())], env=env,
                            capture_output=True, text=True, timeout=120)
    assert no_key.returncode == 2 and "API key is required" in no_key.stderr and "--disable-auth" in no_key.stderr
    assert "Traceback" not in no_key.stderr
    key = secrets.token_urlsafe(24)
    port = free_port()
    log = open(tmp_path / "lookup.log", "wb")
    proc = subprocess.Popen([IMAGEFARM, "serve-lookup", "--port", str(port)], env={**env, "IMAGEFARM_LOOKUP_API_KEY": key},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "lookup.log").read_text()
            time.sleep(0.1)
        assert httpx.post(f"{url}/v1/invalidate", timeout=30).status_code == 401
        h = {"X-API-Key": key}
        assert httpx.post(f"{url}/v1/invalidate", headers=h, timeout=30).json() == {"invalidated": "all"}
        r = httpx.get(f"{url}/v1/lookup", params={"image": "namanjain12/nothing_final:1"}, headers=h, timeout=60)
        assert r.status_code == 404 and "imagefarm derive" in r.json()["build"]
        before = rss_bytes(proc.pid)
        status, pushed = raw_post(url, "/v1/lookup", {}, 1 << 30, push=1 << 30)
        assert status == b"HTTP/1.1 401 Unauthorized", status
        assert pushed < 256 << 20, f"the server kept reading: {pushed} bytes accepted after the 401"
        assert rss_bytes(proc.pid) - before < 50 << 20
        status, _ = raw_post(url, "/v1/lookup", h, 1 << 30, push=64 << 20)
        assert status == b"HTTP/1.1 413 Request Entity Too Large", status
        big = b'{"images": ["' + b"a" * (40 << 20) + b'"]}'
        assert chunked_post(url, "/v1/lookup", h, big).startswith(b"HTTP/1.1 413")
        assert rss_bytes(proc.pid) - before < 50 << 20
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    assert key not in (tmp_path / "lookup.log").read_text()


def test_lookup_caches_are_bounded(settings, registry, fixtures, derive_to):
    from imagefarm.serve.lookup import Lookup

    to = f"{registry.host}/rel-bounded"
    bases = [fixtures.r2e_base("namanjain12/bounded_final", f"{i:040x}").ref for i in range(6)]
    for b in bases:
        derive_to(b, to)
    lk = Lookup(settings.model_copy(update={"to": to}), max_entries=3)
    try:
        for b in bases:
            assert lk.resolve(b) is not None
        for cache in (lk._hits, lk._tags, lk._manifests, lk._verified):
            assert len(cache) <= 3, cache
    finally:
        lk.close()
