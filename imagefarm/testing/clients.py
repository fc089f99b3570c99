"""Real OpenHands client code under Python >= 3.12, made from Debian's packages.

The SDK (``openhands-workspace``: ``APIRemoteWorkspace``) needs Python >= 3.12 and
V0's ``RemoteRuntime`` ships only in ``openhands-ai`` 0.x; this machine's Python is
3.11. The payload builder's Debian 13 rootfs has Python 3.13: each client gets a
venv there (``/opt/imagefarm-clients/<name>``, installed once with uv, cached) and
runs with ``chroot``, which keeps the host's network namespace, so it reaches
servers on 127.0.0.1 like any local process.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from imagefarm.payload.builder import Chroot, builder_rootfs, file_lock, find_uv
from imagefarm.payload.recipe import recipe_for
from imagefarm.settings import Settings

INSIDE = "/opt/imagefarm-clients"



def sdk_at(version: str) -> tuple[str, ...]:
    """The SDK client set at one version, as a trainer pins it: openhands-workspace does not
    pin openhands-agent-server, so without the third pin an older workspace pulls the
    newest server package and the environment mixes versions (preflight refuses that)."""
    return (f"openhands-workspace=={version}", f"openhands-sdk=={version}", f"openhands-agent-server=={version}")


#: the client sets tests use, pinned (1.58.2 is the newest release: no third pin needed)
SDK = ("openhands-workspace==1.58.2", "openhands-sdk==1.58.2")
V0 = ("openhands-ai==0.59.0",)


@dataclass(frozen=True)
class ClientPython:
    root: Path        #: the rootfs the venv lives in
    name: str

    @property
    def python(self) -> str:
        return f"{INSIDE}/{self.name}/bin/python"

    @property
    def command(self) -> list[str]:
        """This Python as a command line run from the host (what a trainer's interpreter is
        to ``imagefarm launch preflight --trainer-python``)."""
        return ["chroot", str(self.root), "/usr/bin/env", "-i", "PATH=/usr/bin:/bin", "HOME=/tmp",
                "LANG=C.UTF-8", "PYTHONDONTWRITEBYTECODE=1", "LITELLM_LOCAL_MODEL_COST_MAP=True",
                "OPENHANDS_SUPPRESS_BANNER=1", self.python]

    def argv(self, script: Path, *args: str) -> list[str]:
        """The command that runs ``script`` (copied into the rootfs) with this Python."""
        scripts = self.root / INSIDE.lstrip("/") / "scripts"
        scripts.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(script, scripts / script.name)
        return [*self.command, f"{INSIDE}/scripts/{script.name}", *args]

    def run(self, script: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(script, *args), capture_output=True, text=True, timeout=timeout)


def client_python(settings: Settings, name: str, requirements: Sequence[str], log=lambda m: None) -> ClientPython:
    """A venv with ``requirements`` in the builder rootfs (installed on first use)."""
    recipe = recipe_for(settings)
    root = builder_rootfs(settings.cache_dir, recipe.builder, log=log)
    key = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:12]
    venv = root / INSIDE.lstrip("/") / name
    stamp = venv / f".imagefarm-{key}"
    if stamp.exists():
        return ClientPython(root, name)
    with file_lock(root.parent / f".{root.name}.clients.lock"):
        if stamp.exists():
            return ClientPython(root, name)
        log(f"installing {', '.join(requirements)} into {venv} (once)")
        uv_cache = Path(settings.cache_dir) / "uv"
        with Chroot(root, binds={"/var/cache/imagefarm-uv": uv_cache}, log=log) as ch:
            uv = ch.install_host_tool(find_uv())
            shutil.rmtree(venv, ignore_errors=True)
            ch.run(["python3", "-m", "venv", "--without-pip", f"{INSIDE}/{name}"], what=f"venv {name}")
            ch.run([uv, "pip", "install", "--python", f"{INSIDE}/{name}/bin/python", "--no-progress",
                    "--cache-dir", "/var/cache/imagefarm-uv", "--link-mode", "copy", *requirements],
                   what=f"installing {name} clients", timeout=1800)
        stamp.write_text("\n".join(requirements) + "\n")
    return ClientPython(root, name)
