"""Errors carry data callers branch on, and map to HTTP statuses in one place."""

from __future__ import annotations

import httpx

from imagefarm.errors import (ConfigError, ImagefarmError, InvalidReference, NotFound, RegistryError,
                              RegistryUnreachable, http_status)
from imagefarm.registry.transport import registry_codes
from imagefarm.runtime.errors import BackendError, CapacityFull, NoPrebuiltImage


def test_one_http_mapping_for_both_servers():
    assert http_status(InvalidReference("x")) == 400
    for upstream in (RegistryError("x"), NotFound("x"), RegistryUnreachable("x")):
        assert http_status(upstream) == 502
    assert http_status(NoPrebuiltImage("i", "b", "t")) == 404
    assert http_status(CapacityFull("full")) == 429
    assert http_status(BackendError("podman")) == 502
    assert http_status(ConfigError("x")) == http_status(ImagefarmError("x")) == http_status(KeyError()) == 500


def test_registry_error_carries_status_codes_and_reference():
    req = httpx.Request("PUT", "http://127.0.0.1:9/v2/a/manifests/t")
    resp = httpx.Response(400, request=req, json={"errors": [
        {"code": "MANIFEST_BLOB_UNKNOWN", "message": "blob unknown to registry"}, {"code": "BLOB_UNKNOWN"}]})
    assert registry_codes(resp) == ("MANIFEST_BLOB_UNKNOWN", "BLOB_UNKNOWN")
    assert registry_codes(httpx.Response(500, request=req, text="oops")) == ()
    exc = NotFound("gone", registry_status=404, codes=("MANIFEST_UNKNOWN",), reference="127.0.0.1:9/a:t",
                   request=req)
    assert (exc.registry_status, exc.codes, exc.reference, exc.request) == (
        404, ("MANIFEST_UNKNOWN",), "127.0.0.1:9/a:t", req)
    plain = RegistryError("no data")
    assert (plain.registry_status, plain.codes, plain.reference, str(plain)) == (None, (), None, "no data")


def test_backend_failure_kind_is_named_once_from_podman_stderr():
    kind = lambda err: BackendError.from_podman("podman run failed", err).kind  # noqa: E731
    assert kind('Error: workdir "/nope" does not exist on container abc') == BackendError.WORKDIR_MISSING
    assert kind("Error: 127.0.0.1:5000/x@sha256:ab: image not known") == BackendError.IMAGE_UNKNOWN
    assert kind("rootlessport listen tcp 127.0.0.1:4000: bind: Address already in use") == BackendError.PORT_IN_USE
    assert kind("Error: something else") == BackendError.OTHER
