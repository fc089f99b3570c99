"""The V0 payload (recipe ``v0``) on foreign bases: the action execution server boots
from the command V0's RemoteRuntime sends, answers its own API, and the agent's shell
is the base's.

Real payload (built once, cached), real derive, real podman; the r2e-style Debian 12
base (glibc 2.36, a venv at /testbed/.venv) and the busybox base with no libc, no bash
and no locale.
"""

from __future__ import annotations

import pytest

from imagefarm.farm.verify import pull, verify
from imagefarm.host.containers import reserved_ports, run
from imagefarm.payload.recipe import recipe_for
from imagefarm.registry import RegistryClient
from imagefarm.names.reference import parse

pytestmark = pytest.mark.slow

MICROMAMBA = "/openhands/micromamba/bin/micromamba"
#: what the launcher leaves in the server's environment (so in the tmux pane's)
ENV_PROBE = ("import os; print(os.environ['PATH']); print(os.environ.get('LOCPATH', '-')); "
             "print(os.environ.get('LD_LIBRARY_PATH', '-')); print(os.path.realpath('/bin/bash'))")


def test_the_v0_layer_is_the_same_blob_in_every_derived_image(settings, v0_images, v0_payload) -> None:
    with RegistryClient(settings) as client:
        layers = {kind: client.resolve(parse(v0_images[kind].image)).manifest.layers[-1].digest
                  for kind in ("r2e", "busybox")}
    assert layers == {"r2e": v0_payload.layer.digest, "busybox": v0_payload.layer.digest}
    assert "-oh0.62.0-v0-" in v0_images["r2e"].image  # the recipe is in the tag


def test_r2e_base_verifies_through_the_action_execution_server(settings, v0_images) -> None:
    result = verify(settings, v0_images["r2e"].image, timeout=300)
    assert result.ok and result.cwd == "/testbed"
    assert result.output.splitlines()[0] == "/testbed/.venv"
    assert not any("/health" in c for c in result.checks)  # V0 has /alive only
    print(f"v0 r2e: /alive after {result.alive_seconds:.1f}s")


def test_busybox_base_without_libc_boots(settings, v0_images) -> None:
    """No libc, no bash, no locale in the base: the payload's bash and C.UTF-8 carry tmux."""
    result = verify(settings, v0_images["busybox"].image, timeout=180)
    assert result.ok and result.expected_prefix is None
    assert result.output.splitlines()[0] == "ok"
    print(f"v0 busybox: /alive after {result.alive_seconds:.1f}s")


def test_the_server_environment_leaks_nothing_into_the_base(settings, v0_images) -> None:
    """r2e: the base's bash and locale, no LD_LIBRARY_PATH, the payload's tools last on PATH;
    busybox: /bin/bash is the payload's (made at start, not in the layer), LOCPATH set."""
    prefix = recipe_for(settings, "v0").payload.prefix
    outs = {}
    for kind in ("r2e", "busybox"):
        pull(settings, v0_images[kind].image)
        proc = run(settings, ["podman", "run", "--rm", "--entrypoint", MICROMAMBA, v0_images[kind].image,
                              "run", "-n", "openhands", "python", "-c", ENV_PROBE], timeout=120)
        outs[kind] = proc.stdout.strip().splitlines()
    path, locpath, ld, bash = outs["r2e"]
    assert path.startswith("/testbed/.venv/bin:") and path.endswith(f":{prefix}/tools/bin")
    assert (locpath, ld, bash) == ("-", "-", "/usr/bin/bash")
    path, locpath, ld, bash = outs["busybox"]
    assert (locpath, ld, bash) == (f"{prefix}/tools/locale", "-", f"{prefix}/tools/bin/bash")


def test_the_launcher_refuses_a_command_it_does_not_know(settings, v0_images) -> None:
    pull(settings, v0_images["r2e"].image)
    proc = run(settings, ["podman", "run", "--rm", "--entrypoint", MICROMAMBA, v0_images["r2e"].image,
                          "install", "numpy"], check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("usage: micromamba run -n ENV") and len(proc.stderr.strip().splitlines()) == 1


def test_agent_skills_and_jupyter_plugins_start(settings, v0_images) -> None:
    """SkyRL asks for ``--plugins agent_skills jupyter``: the kernel gateway is started by
    ``micromamba run -n openhands <the server's python> -m jupyter kernelgateway``, which
    the launcher answers too, and an IPython cell runs."""
    import secrets
    import time

    import httpx

    from imagefarm.farm.verify import _free_port, _logs

    image = v0_images["r2e"].image
    pull(settings, image)
    command = list(recipe_for(settings, "v0").command)
    at = command.index("--username")
    command[at:at] = ["--plugins", "agent_skills", "jupyter"]
    key, port, name = secrets.token_urlsafe(16), _free_port(), f"imagefarm-v0-jupyter-{secrets.token_hex(4)}"
    # as the runtime starts it: the server's port reserved in the container (a Jupyter kernel
    # binds five ephemeral ports; one of them was 60000 once in CI, and the server could not bind)
    run(settings, ["podman", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:60000", *reserved_ports([60000]),
                   "-e", "SESSION_API_KEY", "--entrypoint", command[0], image, *command[1:]],
        timeout=120, env={"SESSION_API_KEY": key})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{url}/alive", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, _logs(settings, name, 40)
            time.sleep(0.2)
        action = {"action": "run_ipython", "args": {"code": "import sys\nprint(sys.version_info[:2])"}}
        r = httpx.post(f"{url}/execute_action", json={"action": action}, headers={"X-Session-API-Key": key},
                       timeout=120)
        assert r.status_code == 200, r.text[:1000] + _logs(settings, name, 40)
        assert r.json()["observation"] == "run_ipython" and "(3, 13)" in r.json()["content"], r.json()
    finally:
        run(settings, ["podman", "rm", "-f", "-t", "0", name], check=False, timeout=60)
