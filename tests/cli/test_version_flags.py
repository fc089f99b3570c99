"""A bad agent-server version is one line, exit 2, on every command that takes one
(flag and IMAGEFARM_AGENT_SERVER_VERSION), before any work."""

from __future__ import annotations

import pytest

from tests.cli.test_config_errors import env, one_error_line  # noqa: F401 - the shared env fixture and check
from tests.conftest import imagefarm_cli

# a closed port: nothing is ever reached
COMMANDS = [("payload", "build"), ("payload", "show"), ("payload", "push"), ("derive", "127.0.0.1:9/r2e/x:1"),
            ("prebuild", "--dataset", "127.0.0.1:9/r2e/x:1"), ("lookup", "127.0.0.1:9/r2e/x:1"),
            ("runtime", "serve", "--disable-auth")]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_bad_version(cmd, env):  # noqa: F811
    one_error_line(imagefarm_cli(*cmd, "--agent-server-version", "1.58 2", env=env),
                   "--agent-server-version", "not a version")
    one_error_line(imagefarm_cli(*cmd, env={**env, "IMAGEFARM_AGENT_SERVER_VERSION": "latest"}),
                   "IMAGEFARM_AGENT_SERVER_VERSION", "not a version")
