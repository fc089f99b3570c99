"""R2E-shaped images of a real PyPI project at consecutive releases, built by buildah.

R2E-Gym's images were built by Docker: an OS base, a venv with the project's
dependencies at ``/testbed/.venv``, and the repository checked out at ``/testbed`` with
its ``.git``. These are made the same way, from real code, by real container tools, so
their layers carry what Go's archive/tar writes (type bits in the mode, PAX headers, the
tools' own ordering and mtimes), not what Python's tarfile writes:

- the OS layer: the cached Debian rootfs (``rootfs.debootstrap``), packed by GNU tar and
  ``ADD``-ed to ``FROM scratch`` (as Docker's official base images are made);
- the venv layer, per release: ``RUN python3 -m venv /testbed/.venv`` and ``pip install``
  into it with the image's own Python, from wheels pip downloaded once into the cache,
  resolved as of the release's date (``--uploaded-prior-to``); no pip and no .pyc in it,
  as uv (R2E's installer) leaves a venv;
- the testbed layer, per release: ``COPY`` of a clone of a git repository into which the
  project's sdists were committed one release after another, cloned at that release
  (its pack holds the history up to it, so ``.git`` differs per image as R2E's do).

The project is installed into the venv from its own wheel (R2E installs the checkout in
editable mode; building a compiled stack from source per image would take hours here).
Each image is tagged by its testbed commit, ``<registry>/namanjain12/<project>_final:<commit>``.

Cache (``<cache_dir>/r2e``): sdists, wheels (one pool, each file once), the git history,
and the built images as one OCI layout per project, keyed by their inputs: a second
build of the same inputs pushes from the layout and builds nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from imagefarm.errors import ToolError
from imagefarm.settings import Settings
from .containers import run, which
from .samples import R2E_PATH, FixtureFactory, FixtureImage, _git

#: bump when the way images are made changes: every cached image is rebuilt
RECIPE_VERSION = 3

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

RUN_TESTS = """#!/bin/bash
# r2e-style test entry point: the repository's tests in its venv
cd /testbed
. /testbed/.venv/bin/activate
exec python -m pytest -x -q "$@"
"""


@dataclass(frozen=True)
class Project:
    """One PyPI project and the releases its group is made of (oldest first)."""

    name: str
    releases: tuple[str, ...]
    #: installed with the project into each venv (its test tools, heavy optional deps)
    extras: tuple[str, ...] = ("pytest",)
    #: what pip needs to read the sdists' metadata without an isolated build env
    build_requires: tuple[str, ...] = ("setuptools", "wheel")

    @property
    def repo(self) -> str:
        return f"namanjain12/{self.name}_final"

    def head(self, n: int) -> "Project":
        return Project(self.name, self.releases[:n], self.extras, self.build_requires)


#: the make-test group: four small images (requests and its four dependencies)
SMALL = Project("requests", ("2.32.0", "2.32.1", "2.32.2", "2.32.3"))
#: the bench group: 16 consecutive xarray releases over numpy, pandas and scipy,
#: 400 MB or more each unpacked
LARGE = Project("xarray", ("2023.4.0", "2023.4.1", "2023.4.2", "2023.5.0", "2023.6.0", "2023.7.0", "2023.8.0",
                           "2023.9.0", "2023.10.0", "2023.10.1", "2023.11.0", "2023.12.0", "2024.1.0", "2024.1.1",
                           "2024.2.0", "2024.3.0"),
                extras=("scipy", "pytest"), build_requires=("setuptools", "setuptools-scm", "wheel"))
PROJECTS = {p.name: p for p in (SMALL, LARGE)}


@dataclass(frozen=True)
class Release:
    """One release as built: its testbed commit, the wheels of its venv, its date."""

    version: str
    commit: str
    date: str                #: ISO date of the sdist (its newest member's mtime)
    wheels: tuple[str, ...]  #: file names in the wheel pool


class ProjectImages:
    """Builds (or finds in the cache) and pushes one project's group of images."""

    def __init__(self, settings: Settings, registry_host: str, log=None, compression: str = "gzip") -> None:
        self.settings, self.host, self.compression = settings, registry_host, compression
        self.log = log or (lambda m: None)
        self.root = settings.cache_dir / "r2e"
        self.wheels = self.root / "wheels"
        self._fixtures = FixtureFactory(settings, registry_host, log=log)

    def close(self) -> None:
        self._fixtures.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- pip, outside the images -------------------------------------------------------
    def _tools(self, project: Project) -> Path:
        """A venv with a pip that knows ``--uploaded-prior-to`` and the sdists' build backends."""
        reqs = sorted({"pip>=26", *project.build_requires})
        venv = self.root / "tools" / hashlib.sha256(repr(reqs).encode()).hexdigest()[:12]
        if not (venv / ".complete").exists():
            self.log(f"r2e: tools venv for reading sdists ({', '.join(reqs)})")
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
            self._pip(venv, ["install", "-q", *reqs], own_config=True)
            (venv / ".complete").write_text("\n".join(reqs))
        return venv

    def _pip(self, venv: Path, args: list[str], *, own_config: bool = False, cwd: Path | None = None) -> str:
        """pip from ``venv``. PyPI's own index (no machine config, no local find-links):
        a local wheel directory has no upload times, and pip then ignores the cut-off."""
        env = dict(os.environ)
        if not own_config:
            for k in [k for k in env if k.startswith("PIP_") and k != "PIP_CERT"]:
                del env[k]
            env["PIP_CONFIG_FILE"] = os.devnull
        proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args],
                              capture_output=True, text=True, env=env, cwd=cwd)
        if proc.returncode != 0:
            raise ToolError(f"pip {' '.join(args[:3])} ... failed (is PyPI reachable?):\n{proc.stderr[-2000:]}")
        return proc.stdout

    def sdist(self, project: Project, version: str) -> Path:
        """The release's sdist, downloaded by pip once."""
        d = self.root / "sdists" / project.name / version
        got = [p for p in d.glob("*.tar.gz")] if d.is_dir() else []
        if got:
            return got[0]
        tmp = Path(tempfile.mkdtemp(dir=self._mk(d.parent), prefix=".dl-"))
        try:
            self._pip(self._tools(project), ["download", "-q", "--no-deps", "--no-binary", ":all:",
                                             "--no-build-isolation", f"{project.name}=={version}", "-d", str(tmp)])
            got = list(tmp.glob("*.tar.gz"))
            if len(got) != 1:
                raise ToolError(f"pip download {project.name}=={version} gave {[p.name for p in tmp.iterdir()]}, "
                                "not one .tar.gz sdist")
            shutil.rmtree(d, ignore_errors=True)
            tmp.rename(d)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return d / got[0].name

    def venv_wheels(self, project: Project, version: str, date: str, python: str) -> tuple[str, ...]:
        """The wheels of the release's venv, resolved as of ``date``, in the shared pool."""
        record = self.root / "resolved" / project.name / f"{version}-cp{python.replace('.', '')}.json"
        if record.exists():
            names = tuple(json.loads(record.read_text()))
            if all((self.wheels / n).exists() for n in names):
                return names
        self._mk(self.wheels)
        cutoff = (datetime.fromisoformat(date) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        tmp = Path(tempfile.mkdtemp(dir=self.wheels.parent, prefix=".wheels-"))
        try:
            plat = [x for p in PLATFORMS for x in ("--platform", p)]
            self._pip(self._tools(project), [
                "download", "-q", "--only-binary", ":all:", *plat, "--python-version", python,
                "--implementation", "cp", "--abi", f"cp{python.replace('.', '')}", "--uploaded-prior-to", cutoff,
                f"{project.name}=={version}", *project.extras, "-d", str(tmp)])
            names = tuple(sorted(p.name for p in tmp.iterdir()))
            for n in names:  # each wheel once in the pool (pip's own cache spared the network)
                if not (self.wheels / n).exists():
                    (tmp / n).rename(self.wheels / n)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._mk(record.parent)
        _atomic(record, json.dumps(names))
        return names

    # -- the git history --------------------------------------------------------------
    def history(self, project: Project) -> tuple[Path, list[Release]]:
        """A git repository with one commit per release (the sdist's tree, dated by it)."""
        sdists = [self.sdist(project, v) for v in project.releases]
        key = _key(project.name, [p.name for p in sdists], RECIPE_VERSION)
        final = self.root / "repos" / f"{project.name}-{key}"
        meta = final / ".git" / "imagefarm-releases.json"
        if not meta.exists():
            self.log(f"r2e: committing {len(sdists)} {project.name} sdists into a git repository")
            work = Path(tempfile.mkdtemp(dir=self._mk(final.parent), prefix=".repo-"))
            try:
                _git(work, "init", "-q", "-b", "main")
                out = []
                for version, sdist in zip(project.releases, sdists):
                    for child in work.iterdir():
                        if child.name != ".git":
                            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
                    subprocess.run([which("tar"), "-xzf", str(sdist), "--strip-components=1", "--no-same-owner",
                                    "-C", str(work)], check=True, capture_output=True)
                    date = _sdist_date(sdist)
                    _git(work, "add", "-A", "-f")
                    _git(work, "commit", "-q", "--allow-empty", "-m", f"{project.name} {version}", date=date)
                    _git(work, "tag", f"v{version}")
                    out.append({"version": version, "commit": _git(work, "rev-parse", "HEAD").strip(),
                                "date": date})
                _git(work, "gc", "-q")
                (work / ".git" / "imagefarm-releases.json").write_text(json.dumps(out))
                shutil.rmtree(final, ignore_errors=True)
                work.rename(final)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        rows = json.loads(meta.read_text())
        return final, [Release(r["version"], r["commit"], r["date"], ()) for r in rows]

    # -- images -------------------------------------------------------------------------
    def _rootfs(self) -> Path:
        return self._fixtures.bookworm_rootfs()

    def _python(self) -> str:
        """The image's Python (major.minor), read from its rootfs."""
        libs = sorted(p.name for p in (self._rootfs() / "usr" / "lib").glob("python3.*") if p.name[8:].isdigit())
        if not libs:
            raise ToolError("the fixture rootfs has no /usr/lib/python3.N")
        return libs[-1].removeprefix("python")

    def base_image(self) -> str:
        """The OS image in buildah's storage: the rootfs packed by GNU tar, ADDed to scratch."""
        root = self._rootfs()
        tag = f"localhost/imagefarm-r2e-os:{_key(root.name, RECIPE_VERSION)}"
        if run(self.settings, ["buildah", "inspect", "--type", "image", tag], check=False).returncode == 0:
            return tag
        self.log("r2e: the OS base layer (GNU tar of the Debian rootfs, ADD in buildah)")
        with tempfile.TemporaryDirectory(dir=self._mk(self.root / "tmp")) as tmp:
            ctx = Path(tmp)
            subprocess.run([which("tar"), "-C", str(root), "--exclude=./testbed", "--exclude=./.complete",
                            "--numeric-owner", "-cf", str(ctx / "rootfs.tar"), "."], check=True, capture_output=True)
            (ctx / "Containerfile").write_text('FROM scratch\nADD rootfs.tar /\nCMD ["/bin/bash"]\n')
            self._bud(ctx, tag)
        return tag

    def _bud(self, ctx: Path, tag: str, *flags: str) -> None:
        # --layers: one layer per RUN and COPY, as Docker makes them (without it buildah
        # commits the whole Containerfile as one layer)
        run(self.settings, ["buildah", "bud", "--isolation", "chroot", "--format", "oci", "--pull=never", "--layers",
                            *flags, "-f", str(ctx / "Containerfile"), "-t", tag, str(ctx)], timeout=3600)

    def layout(self, project: Project) -> Path:
        return self.root / "images" / f"{project.name}-{self.compression}"

    def build(self, project: Project) -> list[tuple[Release, str]]:
        """Every release's image in the project's OCI layout (built only when its inputs
        changed): (release, tag in the layout) in release order."""
        repo, releases = self.history(project)
        python = self._python()
        layout = self.layout(project)
        index = layout.parent / f"{layout.name}.json"
        built = json.loads(index.read_text()) if index.exists() else {}
        out = []
        base = None
        for rel in releases:
            wheels = self.venv_wheels(project, rel.version, rel.date, python)
            rel = Release(rel.version, rel.commit, rel.date, wheels)
            key = _key(self._rootfs().name, project.name, rel.version, rel.commit, wheels, python,
                       self.compression, RECIPE_VERSION)
            tag = rel.commit
            if built.get(tag) != key or not _layout_has(layout, tag):
                base = base or self.base_image()
                t0 = time.monotonic()
                self._build_one(project, repo, rel, base, layout, tag)
                built[tag] = key
                self._mk(layout.parent)
                _atomic(index, json.dumps(built, indent=1))
                self.log(f"r2e: {project.name} {rel.version} built in {time.monotonic() - t0:.0f}s")
            out.append((rel, tag))
        return out

    def _build_one(self, project: Project, repo: Path, rel: Release, base: str, layout: Path, tag: str) -> None:
        with tempfile.TemporaryDirectory(dir=self._mk(self.root / "tmp")) as tmp:
            ctx = Path(tmp)
            # a clone of the history up to this release: its own pack, as an R2E clone has
            _git(ctx, "clone", "-q", "--no-local", "--single-branch", "--branch", f"v{rel.version}",
                 str(repo), "testbed")
            (ctx / "testbed" / "run_tests.sh").write_text(RUN_TESTS)
            (ctx / "testbed" / "run_tests.sh").chmod(0o755)
            pins = " ".join(f"/wheels/{n}" for n in rel.wheels)
            # the venv as uv (R2E's installer) leaves it: no pip in it, no .pyc (a .pyc
            # records its source's mtime: every build would differ in every one); pip
            # runs from a throwaway venv of the same Python, gone before the layer is made
            (ctx / "Containerfile").write_text(
                f"FROM {base}\n"
                "RUN python3 -m venv --without-pip /testbed/.venv && python3 -m venv /tmp/pip && "
                "/tmp/pip/bin/pip --python /testbed/.venv/bin/python install --no-index --no-compile "
                f"--no-cache-dir --disable-pip-version-check -q {pins} && rm -rf /tmp/pip\n"
                "COPY testbed /testbed\n"
                f'ENV VIRTUAL_ENV=/testbed/.venv PATH="{R2E_PATH}" LANG=C.UTF-8\n'
                "WORKDIR /testbed\n"
                'CMD ["/bin/bash"]\n')
            name = f"localhost/imagefarm-r2e-{project.name}:{tag}"
            self._bud(ctx, name, "--volume", f"{self.wheels}:/wheels:ro",
                      "--label", f"org.opencontainers.image.version={rel.version}")
            try:
                self._mk(layout)
                run(self.settings, ["buildah", "push", "--quiet", "--format", "oci", "--compression-format",
                                    self.compression, name, f"oci:{layout}:{tag}"], timeout=3600)
            finally:
                run(self.settings, ["buildah", "rmi", name], check=False)

    def push(self, project: Project) -> list[FixtureImage]:
        """The project's group in the registry (built first where needed)."""
        out = []
        layout = self.layout(project)
        for rel, tag in self.build(project):
            ref = f"{self.host}/{project.repo}:{rel.commit}"
            digestfile = self.root / "tmp" / f".digest-{os.getpid()}"
            self._mk(digestfile.parent)
            run(self.settings, ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--digestfile",
                                str(digestfile), f"oci:{layout}:{tag}", f"docker://{ref}"], timeout=3600)
            out.append(FixtureImage(ref, digestfile.read_text().strip(), "r2e"))
            digestfile.unlink(missing_ok=True)
        return out

    @staticmethod
    def _mk(p: Path) -> Path:
        p.mkdir(parents=True, exist_ok=True)
        return p


def _key(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _sdist_date(sdist: Path) -> str:
    """The newest member's mtime (``tar -tv`` lists them), as an ISO UTC date."""
    listing = subprocess.run([which("tar"), "--utc", "--full-time", "-tvzf", str(sdist)], check=True,
                             capture_output=True, text=True).stdout
    stamps = [" ".join(line.split()[3:5]).split(".")[0] for line in listing.splitlines() if line.strip()]
    newest = max(datetime.strptime(s, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc) for s in stamps)
    return newest.strftime("%Y-%m-%dT%H:%M:%SZ")


def _layout_has(layout: Path, tag: str) -> bool:
    try:
        index = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError):
        return False
    return any(m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
               for m in index.get("manifests", []))
