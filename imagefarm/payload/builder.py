"""The builder: a cached Debian rootfs (debootstrap) and a chroot to build in.

The rootfs is made once per (suite, mirror, packages) under
``cache_dir/builder/<suite>-<hash>``: debootstrap writes into a temporary sibling
which is renamed only when complete, so a crash never leaves a half cache. Builds
in it hold a file lock (one build at a time per rootfs) and mount only what they
need (``/proc``, ``/dev``, the output tree, the download cache), unmounted in
``finally`` whatever happens.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from imagefarm.host.containers import which
from imagefarm.errors import PayloadError, ToolMissing
from imagefarm.oci import canonical_json
from .recipe import BuilderSpec

Log = Callable[[str], None]

#: files copied from the host into the builder before each build
HOST_FILES = {"/etc/resolv.conf": "etc/resolv.conf"}
#: the host's CA bundle (it may hold a proxy's CA) is what uv trusts in the chroot
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
CHROOT_CA = "etc/ssl/imagefarm-host-ca.crt"
_COMPLETE = ".imagefarm-complete"
#: variables passed from the host into chroot commands (proxies, uv/pip index settings)
_PASS_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def _quiet(_msg: str) -> None:
    pass


def _need_root() -> None:
    if os.geteuid() != 0:
        raise PayloadError("building the payload needs root (debootstrap, chroot, mount): run it as root")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def rootfs_key(spec: BuilderSpec) -> str:
    data = {"suite": spec.suite, "mirror": spec.mirror, "packages": sorted(spec.packages), "v": 1}
    return hashlib.sha256(canonical_json(data)).hexdigest()[:16]


def builder_rootfs(cache_dir: Path, spec: BuilderSpec, log: Log = _quiet) -> Path:
    """The cached builder rootfs for ``spec`` (debootstrapped on first use)."""
    _need_root()
    base = Path(cache_dir) / "builder"
    final = base / f"{spec.suite}-{rootfs_key(spec)}"
    if (final / _COMPLETE).exists():
        return final
    with file_lock(base / ".lock"):
        if (final / _COMPLETE).exists():
            return final
        debootstrap = which("debootstrap")
        tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".tmp-{spec.suite}-"))
        try:
            log(f"debootstrap {spec.suite} ({', '.join(spec.packages)}) -> {final} (about a minute)")
            t0 = time.monotonic()
            argv = [debootstrap, "--variant=minbase", f"--include={','.join(spec.packages)}",
                    spec.suite, str(tmp), spec.mirror]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                raise PayloadError(
                    f"debootstrap of Debian {spec.suite} from {spec.mirror} failed "
                    f"(exit {proc.returncode}); check the mirror is reachable:\n{tail}")
            # apt caches are not needed for building and only cost disk
            shutil.rmtree(tmp / "var/cache/apt/archives", ignore_errors=True)
            (tmp / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
            (tmp / _COMPLETE).write_text(f"debootstrap {spec.suite} in {time.monotonic() - t0:.0f}s\n")
            if final.exists():  # an incomplete leftover from an older layout
                shutil.rmtree(final)
            tmp.rename(final)
            log(f"builder rootfs ready in {time.monotonic() - t0:.0f}s")
        finally:
            if tmp.exists():
                _umount_all(tmp)
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _mounts_under(root: Path) -> list[str]:
    root_s = str(root.resolve())
    out = []
    with open("/proc/self/mounts") as fh:
        for line in fh:
            mnt = line.split()[1].replace("\\040", " ")
            if mnt == root_s or mnt.startswith(root_s + "/"):
                out.append(mnt)
    return sorted(out, key=len, reverse=True)


def _umount_all(root: Path) -> None:
    for mnt in _mounts_under(root):
        if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mnt], capture_output=True)


class Chroot:
    """A build session in a builder rootfs: mounts on enter, unmounts on exit.

    ``binds`` maps host directories to absolute paths inside the chroot.
    """

    def __init__(self, root: Path, binds: Mapping[str, Path] | None = None, log: Log = _quiet) -> None:
        self.root = Path(root).resolve()
        self.binds = dict(binds or {})
        self.log = log
        self._lock: contextlib.ExitStack | None = None

    def __enter__(self) -> "Chroot":
        _need_root()
        stack = contextlib.ExitStack()
        stack.enter_context(file_lock(self.root.parent / f".{self.root.name}.lock"))
        stack.callback(_umount_all, self.root)
        self._lock = stack
        try:
            _umount_all(self.root)  # leftovers of a killed build
            for src, dst in HOST_FILES.items():
                if Path(src).exists():
                    target = self.root / dst
                    target.unlink(missing_ok=True)
                    shutil.copyfile(src, target)
            if HOST_CA.exists():
                shutil.copyfile(HOST_CA, self.root / CHROOT_CA)
            self._mount(["-t", "proc", "proc"], self.root / "proc")
            self._mount(["--bind", "/dev"], self.root / "dev")
            for inside, host in self.binds.items():
                Path(host).mkdir(parents=True, exist_ok=True)
                self._mount(["--bind", str(host)], self.root / inside.lstrip("/"))
        except BaseException:
            stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _mount(self, args: list[str], target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise PayloadError(f"mount {' '.join(args)} {target} failed: {proc.stderr.strip()}")

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "SSL_CERT_FILE": "/" + CHROOT_CA,
            "PYTHONHASHSEED": "0",
            "SOURCE_DATE_EPOCH": "0",
        }
        for k in _PASS_ENV:
            if k in os.environ:
                env[k] = os.environ[k]
        for k, v in os.environ.items():
            if k.startswith("UV_") and k not in ("UV_CACHE_DIR", "UV_LINK_MODE"):
                env[k] = v
        if "PIP_INDEX_URL" in os.environ and "UV_DEFAULT_INDEX" not in env:
            env["UV_DEFAULT_INDEX"] = os.environ["PIP_INDEX_URL"]
        env.update(extra or {})
        return env

    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 1800,
            what: str | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the chroot; ``PayloadError`` with its output on failure."""
        full = ["chroot", str(self.root), "/usr/bin/env", "-i",
                *(f"{k}={v}" for k, v in self.env(env).items()), *argv]
        try:
            proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input)
        except subprocess.TimeoutExpired as exc:
            raise PayloadError(f"{what or argv[0]} in the builder timed out after {timeout}s") from exc
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
            raise PayloadError(f"{what or ' '.join(argv[:3])} failed in the builder (exit {proc.returncode}):\n{tail}")
        return proc

    def install_host_tool(self, path: str) -> str:
        """Copy a host executable (uv) into the chroot; its path inside."""
        src = Path(path)
        name = src.name
        dst = self.root / "usr/local/bin" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            tmp = dst.with_suffix(".tmp")
            shutil.copyfile(src, tmp)
            tmp.chmod(0o755)
            tmp.replace(dst)
        return f"/usr/local/bin/{name}"


def find_uv() -> str:
    """uv beside the running Python (``pip install uv``) or on PATH."""
    beside = Path(sys.executable).parent / "uv"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    try:
        return which("uv")
    except ToolMissing:
        raise ToolMissing(
            "uv is not installed: run `pip install uv` in imagefarm's environment "
            "(the payload build installs the agent server with it)") from None


__all__ = ["Chroot", "builder_rootfs", "find_uv", "file_lock"]
