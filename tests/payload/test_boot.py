"""The payload on foreign bases: boots, answers, and the agent's shell is the base's.

Real podman, real registry, fixture bases made here: Debian 12 with a venv at
/testbed/.venv (r2e-shaped; glibc 2.36 while the payload brings 2.41) and a
busybox-only base with no libc at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagefarm.host.containers import run
from imagefarm.errors import VerifyError
from imagefarm.farm.verify import pull, verify

pytestmark = pytest.mark.slow
IMAGEFARM = str(Path(sys.executable).parent / "imagefarm")


def test_r2e_base_verifies_and_sees_the_base_venv(settings, r2e_agent_image) -> None:
    result = verify(settings, r2e_agent_image, timeout=300)
    assert result.ok
    assert result.expected_prefix == "/testbed/.venv"
    assert result.output == "/testbed/.venv"
    assert result.cwd == "/testbed"
    print(f"r2e: /alive after {result.alive_seconds:.1f}s")


def test_r2e_base_as_uid_10001_without_home(settings, r2e_agent_image) -> None:
    """What APIRemoteWorkspace asks for on a root-owned image: uid 10001, cwd /, no HOME."""
    result = verify(settings, r2e_agent_image, timeout=120, user="10001", workdir="/")
    assert result.output == "/testbed/.venv"


def test_busybox_base_without_libc_verifies(settings, busybox_agent_image) -> None:
    result = verify(settings, busybox_agent_image, timeout=120)
    assert result.ok and result.expected_prefix is None
    assert result.output.splitlines()[0] == "ok"
    result = verify(settings, busybox_agent_image, timeout=120, user="10001", workdir="/")
    assert result.output.splitlines() == ["ok", "/tmp/openhands-home-10001"]


def test_agent_shell_environment_is_the_base_s(settings, r2e_agent_image) -> None:
    """No LD_LIBRARY_PATH, the base's PATH first, the payload's python nowhere on PATH."""
    pull(settings, r2e_agent_image)
    script = (
        "import os, shutil, subprocess\n"
        "exec(open('/usr/local/bin/openhands-agent-server').read().split('sys.argv[0] =')[0])\n"
        "from openhands.sdk.utils.command import sanitized_env\n"
        "env = sanitized_env()\n"
        "out = subprocess.run(['bash', '-c', 'echo $PATH; command -v python; python -c \"import sys; print(sys.prefix)\"; "
        "echo LD=${LD_LIBRARY_PATH:-unset}'], env=env, capture_output=True, text=True)\n"
        "print(out.stdout, end='')\n"
    )
    proc = run(settings, ["podman", "run", "--rm", "--entrypoint", "/agent-server/venv/bin/python",
                          r2e_agent_image, "-I", "-c", script], timeout=120)
    path, python, prefix, ld = proc.stdout.strip().splitlines()
    assert path.startswith("/testbed/.venv/bin:") and path.endswith(":/agent-server/tools/bin")
    assert python == "/testbed/.venv/bin/python"
    assert prefix == "/testbed/.venv"
    assert ld == "LD=unset"


_LAUNCHER_ENV = "exec(open('/usr/local/bin/openhands-agent-server').read().split('sys.argv[0] =')[0])\n"


def test_private_tmux_drives_the_sdk_terminal_on_a_base_without_tmux(settings, r2e_agent_image) -> None:
    """The base has bash but no tmux: the SDK finds the payload's tmux (last on PATH)."""
    pull(settings, r2e_agent_image)
    script = _LAUNCHER_ENV + (
        "import subprocess\n"
        "from openhands.tools.terminal.terminal.factory import _is_tmux_available, create_terminal_session\n"
        "from openhands.tools.terminal.definition import TerminalAction\n"
        "print('TMUX', _is_tmux_available())\n"
        "s = create_terminal_session(work_dir='/testbed')\n"
        "s.initialize()\n"
        "print('KIND', type(s.terminal).__name__)\n"
        "obs = s.execute(TerminalAction(command=\"python -c 'import sys; print(sys.prefix)'\"))\n"
        "print('OBS', obs.text)\n"
        "s.close()\n"
        "subprocess.run(['tmux', 'kill-server'], capture_output=True)  # nothing may outlive pid 1\n"
    )
    proc = run(settings, ["podman", "run", "--rm", "--entrypoint", "/agent-server/venv/bin/python",
                          r2e_agent_image, "-I", "-c", script], timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TMUX True" in proc.stdout and "KIND TmuxTerminal" in proc.stdout, proc.stdout[-2000:]
    assert "/testbed/.venv" in proc.stdout.split("OBS", 1)[1], proc.stdout[-2000:]


def test_without_a_utf8_locale_the_sdk_falls_back_from_tmux(settings, busybox_agent_image) -> None:
    """busybox has no locale files: tmux refuses to start, the SDK sees no tmux and
    uses its PTY terminal (which needs bash) -- the server's own /bin/sh API still works."""
    pull(settings, busybox_agent_image)
    script = _LAUNCHER_ENV + (
        "from openhands.tools.terminal.terminal.factory import _is_tmux_available\n"
        "print('TMUX', _is_tmux_available())\n"
    )
    proc = run(settings, ["podman", "run", "--rm", "--entrypoint", "/agent-server/venv/bin/python",
                          busybox_agent_image, "-I", "-c", script], timeout=120)
    assert "TMUX False" in proc.stdout


def test_broken_recipe_fails_verify_with_the_reason(settings, broken_agent_image) -> None:
    with pytest.raises(VerifyError) as err:
        verify(settings, broken_agent_image, timeout=60)
    msg = str(err.value)
    assert "crash" in msg
    assert "no_such_module" in msg  # the container's last log lines are in the reason


def test_timeout_is_reported(settings, r2e_agent_image) -> None:
    with pytest.raises(VerifyError, match="timeout: alive did not answer within"):
        verify(settings, r2e_agent_image, timeout=0.5)


def test_no_container_is_left_behind(settings, r2e_agent_image) -> None:
    verify(settings, r2e_agent_image, timeout=120)
    left = run(settings, ["podman", "ps", "-a", "--filter", "label=imagefarm=verify", "--format", "{{.Names}}"])
    assert left.stdout.strip() == ""


def test_verify_cli(settings, r2e_agent_image, broken_agent_image) -> None:
    env = {**os.environ, "IMAGEFARM_CACHE_DIR": str(settings.cache_dir),
           "IMAGEFARM_STATE_DIR": str(settings.state_dir)}
    ok = subprocess.run([IMAGEFARM, "verify", r2e_agent_image, "--json"], capture_output=True, text=True,
                        env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["ok"] is True and data["output"] == "/testbed/.venv"
    bad = subprocess.run([IMAGEFARM, "verify", broken_agent_image, "--timeout", "60"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert bad.returncode == 2
    assert "crash" in bad.stderr and "Traceback" not in bad.stderr.split("last log lines")[0]


def test_base_working_tree_never_shadows_the_server_s_imports(settings, fixtures, registry, payload, recipe) -> None:
    """r2e's /testbed is the repository under test (tornado, numpy, ...): started there,
    the server must still import its own dependencies. LiteLLM appends the working
    directory to sys.path; tenacity then found /testbed/tornado.py and the server died."""
    from imagefarm.derive import Appender, AppendPayload

    base = fixtures.r2e_base("namanjain12/tornado_final", "a" * 40)
    with Appender(settings) as appender:
        derived = appender.derive(base.ref, AppendPayload.of(payload, recipe), to=f"{registry.host}/shadow")
    result = verify(settings, derived.ref, timeout=240)
    assert result.ok and result.output == "/testbed/.venv" and result.cwd == "/testbed"
