"""Every configuration error is one line, exit 2, no traceback: a bad ``IMAGEFARM_*`` value
(pydantic's ValidationError/SettingsError once escaped as a traceback) and a bad ``--platform``,
run through the installed console script as a user would."""

from __future__ import annotations

import os

import pytest

from tests.conftest import imagefarm_cli

BAD_ENV = {
    "IMAGEFARM_TO": ("a b", "IMAGEFARM_TO"),
    "IMAGEFARM_PLATFORM": ("linux", "os/arch"),
    "IMAGEFARM_REGISTRY_CONCURRENCY": ("many", "IMAGEFARM_REGISTRY_CONCURRENCY"),
    "IMAGEFARM_INSECURE_REGISTRIES": ("not-json", "IMAGEFARM_INSECURE_REGISTRIES"),
}
# commands that read the settings before any work (a closed port: nothing is ever reached)
COMMANDS = [("lookup", "127.0.0.1:9/r2e/x:1"), ("derive", "127.0.0.1:9/r2e/x:1"), ("status",),
            ("worker",), ("payload", "show"), ("dev", "down")]


def one_error_line(proc, *needles: str) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, (proc.returncode, text[-3000:])
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-3000:]
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFARM_")}
    e.update(IMAGEFARM_STATE_DIR=str(tmp_path / "state"), IMAGEFARM_CACHE_DIR=str(tmp_path / "cache"))
    return e


@pytest.mark.parametrize("var", list(BAD_ENV))
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_bad_imagefarm_variable_is_one_line(env, var, command):
    value, needle = BAD_ENV[var]
    one_error_line(imagefarm_cli(*command, env={**env, var: value}, timeout=120), needle, repr(value))


@pytest.mark.parametrize("platform", ["linux", "linux/", "linux/amd64/v8/x", "linux amd64"])
def test_bad_platform_flag_is_one_line(env, platform):
    proc = imagefarm_cli("derive", "127.0.0.1:9/r2e/x:1", "--platform", platform, env=env, timeout=120)
    one_error_line(proc, "--platform", "os/arch[/variant]")
