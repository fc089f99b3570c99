"""What a normal user needs for rootless podman and the unprivileged payload build.

Each check reads the machine as it is (``/etc/subuid``, the mode of ``/dev/net/tun``,
a real ``unshare``) and, when something is missing, names the one root step that
fixes it: on a cluster that is the admin's ``scripts/setup`` run, never imagefarm's.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from pathlib import Path

from imagefarm.settings import Settings

from .doctor import Check

#: ids a rootless user needs below it (Debian's useradd default; images use ids up to 65534)
MIN_RANGE = 65536


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def sub_ids(path: str, user: str, uid: int) -> int:
    """How many subordinate ids ``user`` (or its uid) holds in ``path``."""
    total = 0
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (user, str(uid)) and parts[2].isdigit():
            total += int(parts[2])
    return total


def _ranges() -> list[Check]:
    user, uid = _user(), os.getuid()
    fix = (f"sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user} "
           "(pick a range no other user holds in /etc/subuid)")
    out = []
    for path, what in (("/etc/subuid", "subuid"), ("/etc/subgid", "subgid")):
        n = sub_ids(path, user, uid)
        ok = uid == 0 or n >= MIN_RANGE
        detail = ("root needs none" if uid == 0 and n == 0 else f"{n} ids for {user} in {path}")
        out.append(Check(what, ok, detail, "" if ok else fix))
    return out


def _setuid_tool(name: str) -> Check:
    path = shutil.which(name)
    if not path:
        return Check(name, False, "not found on PATH", "sudo apt-get install -y uidmap")
    st = os.stat(path)
    caps = subprocess.run(["getcap", path], capture_output=True, text=True).stdout if shutil.which("getcap") else ""
    ok = bool(st.st_mode & 0o4000) or "cap_set" in caps
    return Check(name, ok, f"{path} ({'setuid root' if st.st_mode & 0o4000 else caps.strip() or 'no setuid bit'})",
                 "" if ok else f"sudo chmod u+s {path} (or reinstall uidmap)")


def _tun() -> Check:
    dev = Path("/dev/net/tun")
    if not dev.exists():
        return Check("/dev/net/tun", False, "missing (slirp4netns needs it for published ports)",
                     "sudo modprobe tun")
    mode = dev.stat().st_mode & 0o777
    ok = os.access(dev, os.R_OK | os.W_OK)
    return Check("/dev/net/tun", ok, f"mode {mode:04o}" + ("" if ok else ": slirp4netns cannot open it"),
                 "" if ok else "sudo chmod 0666 /dev/net/tun (Debian's udev default; scripts/setup does it)")


def _userns() -> Check:
    """A real user namespace with the user mapped to root (what the payload build uses)."""
    unshare = shutil.which("unshare")
    if not unshare:
        return Check("user namespaces", False, "unshare not found", "sudo apt-get install -y util-linux")
    proc = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "--pid", "--fork", "id", "-u"],
                          capture_output=True, text=True, timeout=30)
    ok = proc.returncode == 0 and proc.stdout.strip() == "0"
    detail = "unshare --user --map-root-user works" if ok else (proc.stderr.strip() or "failed")
    return Check("user namespaces", ok, detail, "" if ok else
                 "sudo sysctl -w user.max_user_namespaces=15000 (and, on Ubuntu, "
                 "kernel.apparmor_restrict_unprivileged_userns=0)")


def _storage_driver(settings: Settings) -> Check:
    from .containers import run

    proc = run(settings, ["podman", "info", "--format", "{{.Store.GraphDriverName}} {{.Store.GraphRoot}}"],
               check=False, timeout=120)
    ok = proc.returncode == 0
    detail = proc.stdout.strip() if ok else (proc.stderr.strip().splitlines() or ["podman info failed"])[-1]
    return Check("storage driver", ok, detail, "" if ok else
                 "set IMAGEFARM_STATE_DIR to a node-local disk the user owns (not NFS); "
                 "`imagefarm doctor` then starts a container there")


def checks(settings: Settings) -> list[Check]:
    """The rootless checks (``podman run`` itself is checked by the doctor beside these)."""
    out = _ranges()
    out += [_setuid_tool("newuidmap"), _setuid_tool("newgidmap")]
    slirp = shutil.which("slirp4netns")
    out.append(Check("slirp4netns", bool(slirp), slirp or "not found on PATH",
                     "" if slirp else "sudo apt-get install -y slirp4netns"))
    out += [_tun(), _userns()]
    mm = shutil.which("mmdebstrap")
    out.append(Check("mmdebstrap", bool(mm), mm or "not found (the unprivileged payload build needs it)",
                     "" if mm else "sudo apt-get install -y mmdebstrap"))
    out.append(_storage_driver(settings))
    return out
