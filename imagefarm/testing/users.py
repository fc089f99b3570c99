"""A normal (non-root) user for tests: the cluster user's point of view.

``NormalUser.ensure(name)`` makes the account (``useradd -m``, with subordinate id
ranges for rootless podman and mmdebstrap) when run as root, and ``user.run(argv)``
runs a command as that user with ``runuser``, a clean environment (HOME, XDG dirs,
PATH) and nothing inherited from root.

The test environment's virtualenv may not be usable by that user: its interpreter
can live under root's 0700 home (pyenv). ``user_venv`` then makes a venv for the user
from the system's python (same minor version) whose ``site`` adds the original
environment's site-packages (the editable imagefarm checkout included), plus the
``imagefarm`` console script and uv: the same code, runnable by the user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from imagefarm.errors import ToolMissing

SUB_RANGE = 65536


def _has_range(path: str, name: str) -> bool:
    try:
        return any(line.split(":")[0] == name for line in Path(path).read_text().splitlines())
    except OSError:
        return False


def _free_start(count: int = SUB_RANGE) -> int:
    """The first subordinate id block no one holds in /etc/subuid or /etc/subgid."""
    end = 100000
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            for line in Path(path).read_text().splitlines():
                parts = line.split(":")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    end = max(end, int(parts[1]) + int(parts[2]))
        except OSError:
            pass
    return end


@dataclass(frozen=True)
class NormalUser:
    name: str
    uid: int
    gid: int
    home: Path

    @classmethod
    def ensure(cls, name: str) -> "NormalUser":
        """The account ``name`` (made when missing: needs root), with subuid/subgid ranges."""
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            if os.geteuid() != 0:
                raise ToolMissing(f"user {name} does not exist and only root can make it (useradd -m {name})")
            subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True, capture_output=True)
            pw = pwd.getpwnam(name)
        if not (_has_range("/etc/subuid", name) and _has_range("/etc/subgid", name)):
            start = _free_start()
            subprocess.run(["usermod", "--add-subuids", f"{start}-{start + SUB_RANGE - 1}",
                            "--add-subgids", f"{start}-{start + SUB_RANGE - 1}", name],
                           check=True, capture_output=True)
        return cls(name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir))

    def env(self, extra: Mapping[str, str] | None = None, path: Sequence[str] = ()) -> dict[str, str]:
        """A login-like environment: nothing of root's leaks in."""
        env = {
            "HOME": str(self.home), "USER": self.name, "LOGNAME": self.name, "LANG": "C.UTF-8",
            "PATH": ":".join([*path, "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"]),
            "XDG_CACHE_HOME": str(self.home / ".cache"),
            "XDG_STATE_HOME": str(self.home / ".local/state"),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_RUNTIME_DIR": f"/tmp/imagefarm-xdg-{self.uid}",
        }
        env.update(extra or {})
        return env

    def argv(self, argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
        """``argv`` as this user (``runuser``; ``env -i``: exactly ``env``)."""
        return ["runuser", "-u", self.name, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv]

    def run(self, argv: Sequence[str], env: Mapping[str, str], *, cwd: str | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
        Path(env.get("XDG_RUNTIME_DIR", "/tmp")).mkdir(mode=0o700, exist_ok=True)
        runtime = Path(env.get("XDG_RUNTIME_DIR", ""))
        if runtime.is_dir() and runtime.stat().st_uid != self.uid:
            os.chown(runtime, self.uid, self.gid)
        return subprocess.run(self.argv(argv, env), capture_output=True, text=True, timeout=timeout,
                              cwd=cwd or str(self.home))

    def owns(self, path: Path) -> None:
        """Make ``path`` (a directory made by root for this user) the user's, 0700."""
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, self.uid, self.gid)
        path.chmod(0o700)


def user_venv(user: NormalUser, dest: Path) -> Path:
    """A venv the user can run with this environment's packages; its bin directory."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    bin_dir = Path(sys.executable).parent
    probe = subprocess.run(user.argv([sys.executable, "-c", "1"], user.env()), capture_output=True)
    if probe.returncode == 0:  # the environment itself is readable by the user
        return bin_dir
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(version, path="/usr/bin:/usr/local/bin")
    if system is None:
        raise ToolMissing(f"{sys.executable} is not readable by {user.name} and there is no /usr/bin/{version} "
                          f"to make a venv for them: apt-get install -y {version}-venv")
    if not (dest / "bin/python").exists():
        subprocess.run([system, "-m", "venv", "--without-pip", str(dest)], check=True, capture_output=True)
    site = dest / "lib" / version / "site-packages"
    (site / "imagefarm-parent.pth").write_text(f"import site; site.addsitedir({str(purelib)!r})\n")
    script = dest / "bin/imagefarm"
    script.write_text(f"#!{dest / 'bin/python'}\nimport sys\nfrom imagefarm.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    for tool in ("uv",):
        src = bin_dir / tool
        if src.exists() and not (dest / "bin" / tool).exists():
            os.symlink(src, dest / "bin" / tool)
    # dependencies resolved for this interpreter may lack backports an older patch
    # release needs (redis-py imports async_timeout before Python 3.11.3)
    old = subprocess.run([str(dest / "bin/python"), "-c", "import sys; print(sys.version_info < (3, 11, 3))"],
                         capture_output=True, text=True).stdout.strip() == "True"
    if old and not list(site.glob("async_timeout*")):
        subprocess.run([str(bin_dir / "uv"), "pip", "install", "--quiet", "--python", str(dest / "bin/python"),
                        "--target", str(site), "async-timeout"], check=True, capture_output=True)
    for p in [dest, *dest.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | 0o444 | (0o111 if p.is_dir() else 0))
    return dest / "bin"
