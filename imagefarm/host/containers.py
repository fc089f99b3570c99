"""Run podman, buildah and skopeo with the project's own container configuration.

Nothing global is touched: every call gets ``CONTAINERS_CONF``,
``CONTAINERS_REGISTRIES_CONF`` and ``CONTAINERS_STORAGE_CONF`` pointing at files the
project ships (runc, ulimits, no short names) and a storage.conf written under the
state directory, so tests and users each get isolated image storage.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from imagefarm.errors import ConfigError, ToolError, ToolMissing
from imagefarm.settings import Settings
from .statedir import private_dir, state_subdir

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


#: podman refuses a ``--runroot`` flag longer than this, and conmon's exit command
#: (``podman container cleanup``) passes the runroot as one
RUNROOT_MAX = 50


def runroot(root: Path) -> Path:
    """podman's run-time directory (locks, mounts, exit files) for the storage at ``root``.

    ``root/run`` when short enough; else a private directory named by ``root``'s hash on
    the runtime tmpfs (``$XDG_RUNTIME_DIR``, ``/run`` for root, else ``/tmp``). A longer
    one made every container's exit cleanup fail: containers stayed "stopped" with their
    mounts held, and each attached ``podman run`` or ``wait`` took 20 s more (measured).
    """
    run = root / "run"
    if len(str(run)) <= RUNROOT_MAX:
        return run
    key = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    bases = [os.environ.get("XDG_RUNTIME_DIR", ""), "/run" if os.geteuid() == 0 else "", "/tmp"]
    for base in filter(None, bases):
        short = Path(base) / f"imagefarm-{os.getuid()}" / key
        if len(str(short)) <= RUNROOT_MAX and os.path.isdir(base):
            return private_dir(private_dir(short.parent) / key)
    raise ConfigError(f"no run-time directory of at most {RUNROOT_MAX} characters for the state directory "
                      f"{root.parent}: set XDG_RUNTIME_DIR to a short private directory")


def storage_conf(state_dir: Path) -> Path:
    """A storage.conf keeping images under ``state_dir`` (both private, 0700)."""
    root = state_subdir(state_dir, "containers")
    return _write_once(root / "storage.conf", (
        "# written by imagefarm: container storage under its state directory\n"
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{root / "storage"}"\n'
        f'runroot = "{runroot(root)}"\n'
        # rootless podman ignores graphroot: without this a normal user's images would
        # land in ~/.local/share/containers, outside the state directory
        f'rootless_storage_path = "{root / "storage"}"\n'
    ))


def containers_conf(state_dir: Path) -> Path:
    """The shipped containers.conf plus this state directory's run-time paths."""
    root = state_subdir(state_dir, "containers")
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    return _write_once(root / "containers.conf", (DATA / "containers.conf").read_text() + (
        "# added for this state directory\n"
        f'tmp_dir = "{root / "tmp"}"\n'
        # no static_dir: conmon's exit command (`podman container cleanup`) gets --root but
        # not this file's static_dir, so it opens <graphroot>/libpod; a static_dir anywhere
        # else left every exit uncleaned ("stopped", never "exited") and made each attached
        # `podman run`, `wait` and `stop` sit out podman's 20 s conmon timeout (measured)
        f'volume_path = "{root / "volumes"}"\n'
        # big blobs of a pull are staged here (default /var/tmp, outside the state dir)
        f'image_copy_tmp_dir = "{root / "tmp"}"\n'
        # rootless podman keeps CNI network configs (and their lock) in ~/.config/cni
        + ("" if os.geteuid() == 0 else f'[network]\nnetwork_config_dir = "{root / "cni"}"\n')
    ))


def reserved_ports(ports: Iterable[int]) -> list[str]:
    """``podman run`` flags that keep a container's published ports out of its own
    ephemeral range. Rootless podman dials each connection to a published port from
    inside the container's network namespace; before the server listens, a dial whose
    ephemeral source port is the server's own connects to itself and holds it, and the
    server's bind then fails "address already in use" (60000 lies in Linux's default
    range; seen in 1 rootless start of 27 while the server probed every 20 ms)."""
    listed = ",".join(sorted({str(int(p)) for p in ports}))
    return ["--sysctl", f"net.ipv4.ip_local_reserved_ports={listed}"] if listed else []


def container_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment podman/buildah/skopeo run with."""
    env = dict(os.environ if base is None else base)
    env["CONTAINERS_CONF"] = str(containers_conf(settings.state_dir))
    env["CONTAINERS_REGISTRIES_CONF"] = str(DATA / "registries.conf")
    env["CONTAINERS_STORAGE_CONF"] = str(storage_conf(settings.state_dir))
    env.setdefault("BUILDAH_ISOLATION", "chroot")
    if settings.auth_file:  # the credentials imagefarm's own client uses (IMAGEFARM_AUTH_FILE)
        env["REGISTRY_AUTH_FILE"] = str(settings.auth_file)
    if os.geteuid() != 0:
        # rootless: containers/image keeps its blob-info cache under $XDG_DATA_HOME
        # (~/.local/share/containers/cache): keep it in the state directory too
        env["XDG_DATA_HOME"] = str(Path(settings.state_dir) / "containers" / "data")
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


def release_mounts(settings: Settings) -> list[str]:
    """Unmount what podman left mounted under this state directory's storage (the
    overlay driver's bind mount of its home, stale layer mounts) once no container of
    it runs: a stopped server or node leaves no mount behind, so its state directory
    can be removed. Root only (a rootless podman's mounts live in its own namespace and
    go with it); returns the mount points that were there and are gone."""
    if os.geteuid() != 0:
        return []
    storage = str(Path(settings.state_dir).resolve() / "containers" / "storage")
    before = _mounts_under(storage)
    if not before:
        return []
    running = run(settings, ["podman", "ps", "-q"], check=False, timeout=60)
    if running.returncode != 0 or running.stdout.strip():
        return []  # containers still run (left for a restarted server): their mounts stay
    for p in sorted(_mounts_under(storage), key=len, reverse=True):
        subprocess.run(["umount", p], capture_output=True)
    after = set(_mounts_under(storage))
    return [p for p in before if p not in after]


def _mounts_under(root: str) -> list[str]:
    try:
        with open("/proc/self/mountinfo") as fh:
            points = [line.split()[4].replace("\\040", " ") for line in fh]
    except OSError:
        return []
    return [p for p in dict.fromkeys(points) if p == root or p.startswith(root + "/")]
