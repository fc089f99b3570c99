"""The configs outside runtime/ (``BatchConfig`` for prebuild, ``LookupServerConfig`` for
serve-lookup): each default written once, in the config, and the CLI's options made from
it; every value checked in ``__post_init__``, and a bad one is one line, exit 2."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from imagefarm.cli.farm import prebuild
from imagefarm.cli.lookup import serve_lookup
from imagefarm.errors import ConfigError
from imagefarm.farm.prebuild import BatchConfig, run_batch
from imagefarm.serve.config import LookupServerConfig
from tests.cli.test_config_errors import env, one_error_line  # noqa: F401 - the fixture
from tests.conftest import imagefarm_cli


@pytest.mark.parametrize("config,command", [(BatchConfig, prebuild), (LookupServerConfig, serve_lookup)])
def test_each_option_default_is_the_configs_own(config, command):
    params = inspect.signature(command).parameters
    for f in dataclasses.fields(config):
        opt = params[f.name].default
        assert opt.default == f.default and opt.help == f.metadata["help"], f.name


def test_run_batch_defaults_are_the_configs_own():
    params = inspect.signature(run_batch).parameters
    for f in dataclasses.fields(BatchConfig):
        assert params[f.name].default == f.default, f.name


@pytest.mark.parametrize("kw,needle", [
    ({"executor": "slurm"}, "--executor must be local or celery"),
    ({"verify": "some"}, "--verify must be all, none or a number"),
    ({"limit": 0}, "--limit"), ({"workers": 0}, "--workers"), ({"verify_timeout": 0}, "--verify-timeout")])
def test_batch_config_refuses(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        BatchConfig(**kw)


@pytest.mark.parametrize("kw,needle", [
    ({"port": 0, "disable_auth": True}, "--port 0"), ({"ttl": -1.0, "disable_auth": True}, "--ttl"),
    ({"host": " ", "disable_auth": True}, "--host"), ({}, "an API key is required"),
    ({"api_key": "k", "disable_auth": True}, "exclude each other")])
def test_lookup_server_config_refuses(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        LookupServerConfig(**kw)



def test_lookup_server_config_keeps_its_key_out_of_its_repr():
    assert "s3cret" not in repr(LookupServerConfig(api_key="s3cret"))


def test_bad_values_are_one_line_on_the_command_line(env):  # noqa: F811
    one_error_line(imagefarm_cli("prebuild", "--dataset", "x.jsonl", "--executor", "slurm", env=env, timeout=120),
                   "--executor")
    one_error_line(imagefarm_cli("serve-lookup", "--port", "0", "--disable-auth", env=env, timeout=120), "--port")
