"""Fixture base images shaped like R2E-Gym's, made here and pushed under r2e names.

An r2e image is an Ubuntu rootfs, a venv at ``/testbed/.venv`` (``VIRTUAL_ENV`` and
``PATH`` set in the image config), the repository checked out at ``/testbed`` (a git
work tree) and ``/testbed/run_tests.sh``. The fixture is the same shape on Debian 12:
a shared OS layer and venv layer (debootstrap, cached) and one small layer unique to
each base. Also: a base with no Python and no libc (scratch plus static busybox) and a
multi-arch index. Images are written as an OCI layout and pushed with skopeo.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from imagefarm import oci
from .containers import run, which
from imagefarm.settings import Settings
from .rootfs import busybox_binary, debootstrap

R2E_PATH = "/testbed/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
R2E_ENV = [f"PATH={R2E_PATH}", "VIRTUAL_ENV=/testbed/.venv", "LANG=C.UTF-8"]
BUSYBOX_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
R2E_REPOS = ("namanjain12/pandas_final", "namanjain12/numpy_final", "namanjain12/aiohttp_final",
             "namanjain12/pillow_final", "namanjain12/tornado_final")

RUN_TESTS = b"""#!/bin/bash
# r2e-style test entry point: runs the repository's tests inside its venv
cd /testbed
. /testbed/.venv/bin/activate
python -c 'import sys; print("python", sys.version.split()[0], "in", sys.prefix)'
exec python -m unittest discover -s tests -v
"""


def commit_for(seed: str) -> str:
    """A deterministic 40-hex 'commit' tag for a fixture base."""
    return hashlib.sha1(seed.encode()).hexdigest()


@dataclass(frozen=True)
class FixtureImage:
    ref: str          #: full reference as pushed, e.g. 127.0.0.1:5000/namanjain12/pandas_final:<hex>
    digest: str       #: manifest (or index) digest
    kind: str         #: "r2e", "busybox" or "index"


class FixtureFactory:
    """Makes fixture bases from cached parts; one per registry host."""

    def __init__(self, settings: Settings, registry_host: str, log=None) -> None:
        self.settings = settings
        self.host = registry_host
        self.log = log
        self.cache = settings.cache_dir / "fixtures"
        self.layers_dir = self.cache / "layers"
        self._work = Path(tempfile.mkdtemp(prefix="imagefarm-fixtures-"))
        self.layout = oci.OCILayout(self._work / "layout")

    def close(self) -> None:
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- cached shared layers ---------------------------------------------------
    def _cached_layer(self, name: str, make) -> oci.Layer:
        meta = self.cache / f"{name}.json"
        if meta.exists():
            layer = oci.Layer.from_json(json.loads(meta.read_text()))
            if layer.path.exists():
                return layer
        layer = make()
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = meta.with_suffix(".tmp")
        tmp.write_text(json.dumps(layer.to_json()))
        tmp.replace(meta)
        return layer

    def bookworm_rootfs(self) -> Path:
        return debootstrap(
            self.settings.cache_dir, "bookworm", ["python3", "python3-venv", "git", "ca-certificates"],
            post=[["python3", "-m", "venv", "/testbed/.venv"]], log=self.log,
        )

    def os_layer(self) -> oci.Layer:
        def make() -> oci.Layer:
            root = self.bookworm_rootfs()
            return oci.write_layer(None, self.layers_dir, root=root, owner=None,
                                   exclude=frozenset({".complete", "testbed", "proc", "sys", "dev"}))
        return self._cached_layer("bookworm-os", make)

    def venv_layer(self) -> oci.Layer:
        def make() -> oci.Layer:
            root = self.bookworm_rootfs()
            return oci.write_layer(None, self.layers_dir, root=root / "testbed", arc_prefix="testbed", owner=None)
        return self._cached_layer("bookworm-venv", make)

    def busybox_layer(self) -> oci.Layer:
        def make() -> oci.Layer:
            busybox = busybox_binary(self.settings.cache_dir)
            applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True)
            entries = [oci.dir_entry(d) for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root")]
            entries.append(oci.dir_entry("tmp", 0o1777))
            entries.append(("bin/busybox", busybox, None))
            for applet in sorted(set(applets.stdout.split())):
                if applet != "bin/busybox":
                    depth = applet.count("/")
                    entries.append(oci.symlink_entry(applet, "../" * depth + "bin/busybox"))
            entries.append(oci.file_entry("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"))
            entries.append(oci.file_entry("etc/group", b"root:x:0:\n"))
            return oci.write_layer(entries, self.layers_dir)
        return self._cached_layer("busybox", make)

    # -- per-image parts ----------------------------------------------------------
    def testbed_layer(self, repo: str, commit: str, unique_bytes: int = 0) -> oci.Layer:
        """The per-base layer: a git work tree at /testbed, tests, run_tests.sh.

        Cached: git's index records file stat data, so a rebuild differs in bytes.
        """
        name = f"testbed-{repo.replace('/', '_')}-{commit}-{unique_bytes}"
        return self._cached_layer(name, lambda: self._make_testbed(repo, commit, unique_bytes))

    def _make_testbed(self, repo: str, commit: str, unique_bytes: int) -> oci.Layer:
        work = Path(tempfile.mkdtemp(dir=self._work))
        tb = work / "testbed"
        (tb / "tests").mkdir(parents=True)
        pkg = repo.split("/")[-1].replace("_final", "").replace("-", "_")
        (tb / f"{pkg}.py").write_text(f'"""Fixture package {repo} at {commit}."""\nVERSION = "{commit}"\n')
        (tb / "tests" / "__init__.py").write_text("")
        (tb / "tests" / "test_basic.py").write_text(
            f"import unittest\nimport {pkg}\n\n\nclass T(unittest.TestCase):\n"
            f"    def test_version(self):\n        self.assertEqual({pkg}.VERSION, {commit!r})\n"
        )
        (tb / "run_tests.sh").write_bytes(RUN_TESTS)
        (tb / "run_tests.sh").chmod(0o755)
        if unique_bytes:
            rnd = random.Random(commit)
            with open(tb / "data.bin", "wb") as fh:
                left = unique_bytes
                while left:
                    n = min(left, 1 << 20)
                    fh.write(rnd.randbytes(n))
                    left -= n
        for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", f"{repo} {commit}"]):
            _git(tb, *cmd)
        layer = oci.write_layer(None, self.layers_dir, root=tb, arc_prefix="testbed")
        shutil.rmtree(work, ignore_errors=True)
        return layer

    # -- one repository's history (re-layering fixtures) -----------------------------
    def history_repo(self, repo: str, commits: int, files: int) -> tuple[Path, list[str]]:
        """A git repository of ``files`` seeded source files over ``commits`` commits (each
        rewrites a few files, adds one, now and then deletes one), cached; its commit ids."""
        name = f"{repo.replace('/', '_')}-{commits}-{files}"
        final = self.cache / "repos" / name
        if not (final / ".complete").exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(dir=final.parent, prefix=".repo-"))
            try:
                self._make_history(work, repo, commits, files)
                (work / ".complete").write_text("\n".join(_git(work, "rev-list", "--reverse", "HEAD").split()))
                shutil.rmtree(final, ignore_errors=True)
                work.rename(final)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return final, (final / ".complete").read_text().split()

    def _make_history(self, work: Path, repo: str, commits: int, files: int) -> None:
        rnd = random.Random(repo)
        pkg = repo.split("/")[-1].replace("_final", "").replace("-", "_")
        words = [f"{a}{b}" for a in ("data", "frame", "index", "series", "block", "array") for b in range(40)]

        def module(i: int, rev: int) -> str:
            body = "\n".join(f"def {rnd.choice(words)}_{i}_{k}(x):\n    return x * {rnd.randint(1, 99)} + {rev}\n"
                             for k in range(rnd.randint(20, 80)))
            return f'"""{pkg} module {i} (revision {rev})."""\n\n{body}'
        src = work / pkg
        (src).mkdir()
        (work / "tests").mkdir()
        (src / "__init__.py").write_text(f'"""Fixture package {repo}."""\n')
        (work / "tests" / "__init__.py").write_text("")
        (work / "tests" / "test_basic.py").write_text(
            f"import unittest\nimport {pkg}\n\n\nclass T(unittest.TestCase):\n"
            f"    def test_import(self):\n        self.assertTrue({pkg}.__doc__)\n")
        (work / "run_tests.sh").write_bytes(RUN_TESTS)
        (work / "run_tests.sh").chmod(0o755)
        live = list(range(files))
        for i in live:
            (src / f"mod_{i:04d}.py").write_text(module(i, 0))
        _git(work, "init", "-q", "-b", "main")
        for rev in range(commits):
            if rev:
                for i in rnd.sample(live, min(5, len(live))):
                    (src / f"mod_{i:04d}.py").write_text(module(i, rev))
                live.append(files + rev)
                (src / f"mod_{files + rev:04d}.py").write_text(module(files + rev, rev))
                if rev % 4 == 0:
                    gone = live.pop(rnd.randrange(len(live)))
                    (src / f"mod_{gone:04d}.py").unlink()
            _git(work, "add", "-A")
            _git(work, "commit", "-q", "-m", f"{repo} revision {rev}", date=f"2020-01-{1 + rev % 28:02d}T00:00:00Z")

    def checkout_layer(self, repo: str, commits: int, files: int, commit: str) -> oci.Layer:
        """/testbed: a clone of the history checked out at ``commit`` (with its .git)."""
        def make() -> oci.Layer:
            src, _ = self.history_repo(repo, commits, files)
            work = Path(tempfile.mkdtemp(dir=self._work))
            try:
                _git(work, "clone", "-q", "--no-hardlinks", str(src), "testbed")
                _git(work / "testbed", "checkout", "-q", "--detach", commit)
                return oci.write_layer(None, self.layers_dir, root=work / "testbed", arc_prefix="testbed")
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return self._cached_layer(f"checkout-{repo.replace('/', '_')}-{commits}-{files}-{commit}", make)

    def installed_venv_layer(self, repo: str, commit: str) -> oci.Layer:
        """/testbed/.venv with the repository installed into it (a .pth and a dist-info
        naming the commit): the same venv files in every image but those few."""
        def make() -> oci.Layer:
            pkg = repo.split("/")[-1].replace("_final", "").replace("-", "_")
            work = Path(tempfile.mkdtemp(dir=self._work))
            try:
                venv = work / "testbed" / ".venv"
                shutil.copytree(self.bookworm_rootfs() / "testbed" / ".venv", venv, symlinks=True)
                site = next(venv.glob("lib/python3*/site-packages"))
                (site / f"__editable__.{pkg}.pth").write_text("/testbed\n")
                info = site / f"{pkg}-0.0+g{commit[:10]}.dist-info"
                info.mkdir()
                (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {pkg}\nVersion: 0.0+g{commit[:10]}\n")
                (info / "RECORD").write_text(f"__editable__.{pkg}.pth,,\n")
                return oci.write_layer(None, self.layers_dir, root=work / "testbed", arc_prefix="testbed",
                                       owner=None)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return self._cached_layer(f"venv-{repo.replace('/', '_')}-{commit}", make)

    def r2e_history(self, repo: str = "namanjain12/relayer_final", n: int = 20, files: int = 300
                    ) -> list[FixtureImage]:
        """``n`` bases of one repository, one per commit, shaped like R2E-Gym's: the shared
        OS layer, then the checkout and the venv installed for it as separate layers."""
        _, commits = self.history_repo(repo, n, files)
        out = []
        for commit in commits:
            layers = [self.os_layer(), self.checkout_layer(repo, n, files, commit),
                      self.installed_venv_layer(repo, commit)]
            config = oci.image_config(layers, env=R2E_ENV, cmd=["/bin/bash"], working_dir="/testbed",
                                      history=[{"created": oci.EPOCH_ISO, "created_by": step} for step in
                                               ("debootstrap bookworm", f"git checkout {commit}",
                                                "uv venv /testbed/.venv && uv pip install -e /testbed")])
            tag = f"{repo.replace('/', '_')}-{commit}"
            desc = self.layout.add_image(layers, config, tag)
            ref = f"{self.host}/{repo}:{commit}"
            self.push(tag, ref)
            out.append(FixtureImage(ref, desc.digest, "r2e"))
        return out

    # -- images -------------------------------------------------------------------
    def push(self, tag_in_layout: str, ref: str) -> None:
        run(self.settings, ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--all",
                            f"oci:{self.layout.path}:{tag_in_layout}", f"docker://{ref}"])

    def r2e_base(self, repo: str = R2E_REPOS[0], commit: str | None = None, unique_bytes: int = 0) -> FixtureImage:
        commit = commit or commit_for(f"{repo}-0")
        layers = [self.os_layer(), self.venv_layer(), self.testbed_layer(repo, commit, unique_bytes)]
        config = oci.image_config(layers, env=R2E_ENV, cmd=["/bin/bash"], working_dir="/testbed",
                                  history=[{"created": oci.EPOCH_ISO, "created_by": step} for step in
                                           ("debootstrap bookworm", "python3 -m venv /testbed/.venv",
                                            f"COPY {repo}@{commit} /testbed")])
        tag = f"{repo.replace('/', '_')}-{commit}"
        desc = self.layout.add_image(layers, config, tag)
        ref = f"{self.host}/{repo}:{commit}"
        self.push(tag, ref)
        return FixtureImage(ref, desc.digest, "r2e")

    def r2e_set(self, n: int, unique_bytes: int = 0) -> list[FixtureImage]:
        """``n`` distinct r2e-style bases spread over a few repositories."""
        return [self.r2e_base(R2E_REPOS[i % len(R2E_REPOS)], commit_for(f"{R2E_REPOS[i % len(R2E_REPOS)]}-{i}"),
                              unique_bytes) for i in range(n)]

    def busybox_base(self, repo: str = "fixtures/busybox", tag: str = "1") -> FixtureImage:
        layers = [self.busybox_layer()]
        config = oci.image_config(layers, env=BUSYBOX_ENV, cmd=["sh"])
        desc = self.layout.add_image(layers, config, f"busybox-{tag}")
        ref = f"{self.host}/{repo}:{tag}"
        self.push(f"busybox-{tag}", ref)
        return FixtureImage(ref, desc.digest, "busybox")

    def multiarch(self, repo: str = "fixtures/multiarch", tag: str = "1") -> FixtureImage:
        """An image index: linux/amd64 (busybox) and linux/arm64 (a config-only twin)."""
        layers = [self.busybox_layer()]
        amd = self.layout.add_image(layers, oci.image_config(layers, env=BUSYBOX_ENV, cmd=["sh"]), "ma-amd64")
        arm = self.layout.add_image(
            layers, oci.image_config(layers, env=BUSYBOX_ENV, cmd=["sh"], architecture="arm64"), "ma-arm64")
        index = self.layout.add_index([
            oci.Descriptor(amd.media_type, amd.digest, amd.size, platform={"architecture": "amd64", "os": "linux"}),
            oci.Descriptor(arm.media_type, arm.digest, arm.size,
                           platform={"architecture": "arm64", "os": "linux", "variant": "v8"}),
        ], f"ma-{tag}")
        ref = f"{self.host}/{repo}:{tag}"
        self.push(f"ma-{tag}", ref)
        return FixtureImage(ref, index.digest, "index")


def _git(cwd: Path, *args: str, date: str = "2020-01-01T00:00:00Z") -> str:
    """git with a fixed identity and date, so the same history gives the same commits."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "r2e", "GIT_AUTHOR_EMAIL": "r2e@example.invalid",
           "GIT_COMMITTER_NAME": "r2e", "GIT_COMMITTER_EMAIL": "r2e@example.invalid",
           "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date}
    return subprocess.run([which("git"), *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout
