"""Fixtures for the registry client tests: a real docker-registry per module, a
client with fast backoff and no ambient credentials, and the fault proxy (regkit)."""

from __future__ import annotations

import pytest

from imagefarm.registry import RegistryClient
from imagefarm.settings import Settings
from imagefarm.host.services import Registry
from regkit import FaultProxy


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    with Registry.create(tmp_path_factory.mktemp("reg")) as r:
        yield r


@pytest.fixture
def rsettings(tmp_path) -> Settings:
    return Settings(state_dir=tmp_path / "state", cache_dir=tmp_path / "cache", auth_file=None)


@pytest.fixture
def client(rsettings):
    with RegistryClient(rsettings, backoff=0.01, max_backoff=0.05, credentials={}) as c:
        yield c


@pytest.fixture
def proxy(reg):
    p = FaultProxy(reg.url)
    yield p
    p.close()
