"""Run podman, buildah and skopeo with the project's own container configuration.

Nothing global is touched: every call gets ``CONTAINERS_CONF``,
``CONTAINERS_REGISTRIES_CONF`` and ``CONTAINERS_STORAGE_CONF`` pointing at files the
project ships (runc, ulimits, no short names) and a storage.conf written under the
state directory, so tests and users each get isolated image storage.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from imagefarm.errors import ToolError, ToolMissing
from imagefarm.settings import Settings
from .statedir import state_subdir

DATA = Path(__file__).resolve().parents[1] / "data"

INSTALL_HINT = {
    "podman": "apt-get install -y podman runc",
    "buildah": "apt-get install -y buildah",
    "skopeo": "apt-get install -y skopeo",
    "runc": "apt-get install -y runc",
    "docker-registry": "apt-get install -y docker-registry",
    "redis-server": "apt-get install -y redis-server",
    "debootstrap": "apt-get install -y debootstrap",
    "fuse-overlayfs": "apt-get install -y fuse-overlayfs",
    "htpasswd": "apt-get install -y apache2-utils",
    "git": "apt-get install -y git",
    "slurmctld": "apt-get install -y slurm-wlm munge",
    "slurmd": "apt-get install -y slurm-wlm munge",
    "sbatch": "apt-get install -y slurm-wlm",
    "munged": "apt-get install -y munge",
}


def which(tool: str) -> str:
    """Path of ``tool`` or ``ToolMissing`` saying how to install it."""
    path = shutil.which(tool)
    if not path:
        hint = INSTALL_HINT.get(tool, f"install {tool}")
        raise ToolMissing(f"{tool} is not installed (or not on PATH): run `{hint}` or scripts/setup")
    return path


def _write_once(path: Path, text: str) -> Path:
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def storage_conf(state_dir: Path) -> Path:
    """A storage.conf keeping images under ``state_dir`` (both private, 0700)."""
    root = state_subdir(state_dir, "containers")
    return _write_once(root / "storage.conf", (
        "# written by imagefarm: container storage under its state directory\n"
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{root / "storage"}"\n'
        f'runroot = "{root / "run"}"\n'
    ))


def containers_conf(state_dir: Path) -> Path:
    """The shipped containers.conf plus this state directory's run-time paths."""
    root = state_subdir(state_dir, "containers")
    return _write_once(root / "containers.conf", (DATA / "containers.conf").read_text() + (
        "# added for this state directory\n"
        f'tmp_dir = "{root / "tmp"}"\n'
        f'static_dir = "{root / "libpod"}"\n'
        f'volume_path = "{root / "volumes"}"\n'
    ))


def container_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment podman/buildah/skopeo run with."""
    env = dict(os.environ if base is None else base)
    env["CONTAINERS_CONF"] = str(containers_conf(settings.state_dir))
    env["CONTAINERS_REGISTRIES_CONF"] = str(DATA / "registries.conf")
    env["CONTAINERS_STORAGE_CONF"] = str(storage_conf(settings.state_dir))
    env.setdefault("BUILDAH_ISOLATION", "chroot")
    if settings.auth_file:  # the credentials imagefarm's own client uses (IMAGEFARM_AUTH_FILE)
        env["REGISTRY_AUTH_FILE"] = str(settings.auth_file)
    return env


def run(
    settings: Settings,
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = 600,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a container tool; raise ``ToolError`` with its stderr on failure."""
    exe = which(argv[0])
    full_env = container_env(settings)
    if env:
        full_env.update(env)
    try:
        proc = subprocess.run(
            [exe, *argv[1:]],
            capture_output=True,
            text=input is None,
            input=input,
            env=full_env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise ToolError(f"`{' '.join(argv[:3])} ...` timed out after {timeout}s") from exc
    if isinstance(proc.stdout, bytes):
        proc = subprocess.CompletedProcess(
            proc.args, proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        )
    if check and proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise ToolError(f"`{' '.join(argv[:4])}` failed (exit {proc.returncode}):\n{tail}")
    return proc
