"""A cluster user's point of view: a normal user the suite makes, running imagefarm.

Run as root (as CI does), the session makes the account ``imagefarm-rl`` (``useradd
-m``, subuid/subgid ranges) and runs every command as it with ``runuser`` and a clean
environment: HOME, XDG dirs, state and cache directories under a fresh directory of
``/tmp`` owned by the user (node-local disk, per job), nothing inherited from root.
Run as a normal user, that user is the one. The test venv's interpreter may live under
root's 0700 home (pyenv): ``imagefarm.testing.users.user_venv`` then gives the user a
venv of the system python that uses the same packages and this checkout (which must
be readable by the user: the suite fails saying so if it is not).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagefarm.host.samples import FixtureFactory
from imagefarm.host.services import Registry
from imagefarm.testing.users import NormalUser, user_venv

USER = "imagefarm-rl"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class AsUser:
    """Runs the ``imagefarm`` console script (and anything else) as the normal user."""

    user: NormalUser
    bin: Path
    work: Path  # owned by the user: HOME, per-job state and cache dirs live here
    trusted: Path  # root's public key: the user trusts what root's farm signed

    @property
    def home(self) -> Path:
        return self.work / "home"

    def job(self, name: str) -> dict[str, str]:
        """IMAGEFARM_STATE_DIR / IMAGEFARM_CACHE_DIR of one job (fresh, the user's, 0700)."""
        out = {}
        for kind in ("state", "cache"):
            d = self.work / "jobs" / name / kind
            for p in (self.work / "jobs", self.work / "jobs" / name, d):
                self.user.owns(p)
            out[f"IMAGEFARM_{kind.upper()}_DIR"] = str(d)
        return out

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = self.user.env(path=[str(self.bin)])
        env.update({"HOME": str(self.home), "XDG_CACHE_HOME": str(self.home / ".cache"),
                    "XDG_STATE_HOME": str(self.home / ".local/state"),
                    "XDG_CONFIG_HOME": str(self.home / ".config"),
                    "XDG_RUNTIME_DIR": str(self.work / "run"),
                    "IMAGEFARM_RECIPES_DIR": str(REPO / "recipes"),
                    "IMAGEFARM_TRUSTED_KEYS": str(self.trusted)})
        env.update(extra or {})
        return env

    def run(self, argv: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return self.user.run(argv, env, cwd=str(self.home), timeout=timeout)

    def imagefarm(self, *args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return self.run([str(self.bin / "imagefarm"), *args], env, timeout=timeout)

    def popen(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        fh = open(log, "ab")
        os.chown(log, self.user.uid, self.user.gid)
        return subprocess.Popen(self.user.argv(argv, env), stdout=fh, stderr=subprocess.STDOUT,
                                cwd=str(self.home), start_new_session=True)

    def written_outside(self, allowed: list[Path]) -> list[str]:
        """Files the user owns in HOME, /tmp, /var/tmp, /dev/shm outside ``allowed``."""
        roots = [self.home, Path("/tmp"), Path("/var/tmp"), Path("/dev/shm")]
        proc = subprocess.run(["find", *map(str, roots), "-xdev", "-user", self.user.name, "-type", "f",
                               "-print0"], capture_output=True, text=True)
        keep = [str(a) + "/" for a in allowed]
        return sorted(f for f in proc.stdout.split("\0") if f and not any(f.startswith(k) for k in keep))


@pytest.fixture(scope="session")
def as_user() -> AsUser:
    user = NormalUser.ensure(USER)
    probe = subprocess.run(user.argv(["test", "-r", str(REPO / "imagefarm/__init__.py")], user.env()))
    if probe.returncode != 0:
        pytest.fail(f"the checkout {REPO} is not readable by {USER}: the rootless tests run this code as "
                    f"that user; make its directories world-readable (chmod o+rx) or clone it elsewhere")
    base = Path(tempfile.mkdtemp(prefix="imagefarm-rootless-", dir="/tmp"))
    base.chmod(0o755)
    work = base / "user"
    user.owns(work)
    for d in ("home", "run"):
        user.owns(work / d)
    venv_dir = base / "venv"
    bin_dir = user_venv(user, venv_dir)
    # what root publishes (the payload, its signature) is signed with root's key: the
    # user trusts its public half, as a cluster user trusts the farm's
    from imagefarm.settings import Settings
    from imagefarm.sign import keys

    root_pub = keys.signer(Settings().config_dir).path.with_name(keys.PUB_NAME)
    trusted = base / "trusted"
    trusted.mkdir(mode=0o755)
    shutil.copy(root_pub, trusted / "farm-root.pub")
    (trusted / "farm-root.pub").chmod(0o644)
    u = AsUser(user, bin_dir, work, trusted)
    yield u
    # leave no container or storage behind: each job's podman, as the user (the SLURM
    # runtime job's node-local state is /tmp/imagefarm-runtime-<job id>, see its script)
    job_states = [p for p in Path("/tmp").glob("imagefarm-runtime-*") if p.stat().st_uid == user.uid]
    for state in [*(work / "jobs").glob("*/state"), *job_states]:
        if (state / "containers").is_dir():
            env = u.env({"IMAGEFARM_STATE_DIR": str(state)})
            # containers only: the files go with the directory below (root removes them faster
            # than `podman system reset` does)
            done = u.run([str(bin_dir / "python"), "-c",
                          "from imagefarm.host.containers import run; from imagefarm.settings import Settings;"
                          "run(Settings(), ['podman','rm','--all','--force','--time','0'])"], env, timeout=300)
            assert done.returncode == 0, f"the user's containers in {state} were not removed: {done.stderr[-2000:]}"
    for d in (base, *job_states):
        shutil.rmtree(d, ignore_errors=True)
    if os.geteuid() == 0:  # the account is the suite's: its rootless podman pause processes go too
        _kill_pause_processes(user.uid)


def _kill_pause_processes(uid: int) -> None:
    """Rootless podman keeps one pause process per runtime directory (its user namespace),
    for ever: argv is the podman executable alone."""
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and p.stat().st_uid == uid:
                argv = (p / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
                if len(argv) == 1 and argv[0].rsplit(b"/", 1)[-1] == b"podman":
                    os.kill(int(p.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


@pytest.fixture(scope="module")
def rreg(tmp_path_factory):
    """A registry whose access log the tests read (what was pulled, mounted, pushed)."""
    with Registry.create(tmp_path_factory.mktemp("rootless-registry"), access_log=True) as r:
        yield r


@pytest.fixture(scope="module")
def rfixtures(settings, rreg):
    with FixtureFactory(settings, rreg.host) as f:
        yield f
