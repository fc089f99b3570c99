"""The lookup API's key: 401 for a missing or wrong key, before any input is looked at;
the key never comes back in a response, a header or a log line (all loggers captured
at DEBUG with access logs on); the comparison is ``hmac.compare_digest``."""

from __future__ import annotations

import hmac
import secrets

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


def test_empty_configured_key_is_refused(settings):
    """An empty key would admit anyone sending an empty header: refused at start."""
    with pytest.raises(ConfigError, match="empty"):
        apikey.require_key("")
    apikey.require_key(None)  # auth off is explicit
