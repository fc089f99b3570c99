"""A quick stand-in payload (one small file) named as the default recipe, so lookup
tests derive real images in the real registry without building the real payload."""

import pytest

from imagefarm import oci
from imagefarm.derive import Appender, AppendPayload
from imagefarm.payload.recipe import recipe_for


@pytest.fixture(scope="session")
def small_payload(settings, tmp_path_factory):
    recipe = recipe_for(settings)
    layer = oci.write_layer([oci.dir_entry("usr"), oci.dir_entry("usr/local"), oci.dir_entry("usr/local/bin"),
                             oci.file_entry("usr/local/bin/openhands-agent-server", b"#!/bin/sh\necho stand-in\n", 0o755)],
                            tmp_path_factory.mktemp("payload"))
    return AppendPayload(layer, recipe.name, recipe.digest, recipe.agent_server_version, tuple(recipe.env))


@pytest.fixture
def derive_to(settings, small_payload):
    """derive_to(base_ref, to) -> DeriveResult, with the stand-in payload."""
    appender = Appender(settings)

    def run(base: str, to: str):
        return appender.derive(base, small_payload, to=to)

    yield run
    appender.close()
