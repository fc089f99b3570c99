"""Fixtures for the derive tests: real registries (module scope, named ``dreg``/``dreg2``
so they never clash with the session fixtures), isolated settings, busybox bases."""

from __future__ import annotations

import pytest

from imagefarm.host.containers import run
from imagefarm.derive import Appender
from imagefarm.registry import RegistryClient
from imagefarm.settings import Settings
from imagefarm.host.services import Registry
from derivekit import busybox_layer, synthetic_payload


@pytest.fixture(scope="module")
def dreg(tmp_path_factory):
    with Registry.create(tmp_path_factory.mktemp("dreg")) as r:
        yield r


@pytest.fixture(scope="module")
def dreg2(tmp_path_factory):
    with Registry.create(tmp_path_factory.mktemp("dreg2")) as r:
        yield r


@pytest.fixture(scope="module")
def dwork(tmp_path_factory):
    return tmp_path_factory.mktemp("derive-work")


@pytest.fixture(scope="module")
def dsettings(tmp_path_factory, dreg) -> Settings:
    state = tmp_path_factory.mktemp("derive-state")
    s = Settings(state_dir=state, cache_dir=state / "cache", to=f"{dreg.host}/prebuilt")
    yield s
    run(s, ["podman", "rm", "--all", "--force", "--time", "0"], check=False, timeout=120)
    run(s, ["buildah", "rm", "--all"], check=False, timeout=120)
    run(s, ["podman", "system", "reset", "--force"], check=False, timeout=120)


@pytest.fixture
def appender(dsettings):
    client = RegistryClient(dsettings, credentials={}, backoff=0.01)
    with Appender(dsettings, client) as a:
        yield a


@pytest.fixture(scope="module")
def bb_layer(dwork):
    return busybox_layer(dwork / "blobs")


@pytest.fixture(scope="module")
def payload(dwork):
    return synthetic_payload(dwork / "payload")
