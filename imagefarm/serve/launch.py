"""The last mile: training runs exactly the prebuilt images the lockfile pins.

* ``preflight``: every training and validation instance has a verified prebuilt
  image under the current recipe, still present in the registry, and (given the
  trainer's interpreter, ``trainer_versions``) at the openhands-agent-server version
  the trainer's openhands-sdk / openhands-workspace speak;
* ``rewrite_dataset``: a copy of SkyRL's parquet whose image fields point at the
  pinned prebuilt references (SkyRL reads ``instance.instance_id`` for R2E rows);
* ``env_file``: what the training job exports (runtime URL and key);
* ``ray_env`` and ``remap_cuda_visible_devices``: helpers a training entry point
  imports (Ray ``runtime_env`` propagation; the MIG UUID fix before vLLM starts).
"""

from __future__ import annotations

import importlib.resources
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, MutableMapping

from imagefarm.farm.catalog import Catalog, image_of, resolve_files
from imagefarm.errors import ConfigError, ImagefarmError
from imagefarm.farm.lockfile import Entry, Lockfile
from .lookup import build_command
from imagefarm.names.reference import parse
from imagefarm.settings import version_key

RUNTIME_ENV_VARS = ("SANDBOX_REMOTE_RUNTIME_API_URL", "ALLHANDS_API_KEY", "SANDBOX_API_KEY",
                    "IMAGEFARM_LOCKFILE", "LITELLM_LOCAL_MODEL_COST_MAP")


# -- preflight ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    instance_id: str
    base: str
    reason: str           #: missing, unverified, stale-recipe, gone-from-registry
    fix: str


#: what the trainer talks to the agent server with (released in step, one version)
TRAINER_PACKAGES = ("openhands-sdk", "openhands-workspace", "openhands-agent-server")
_PROBE = ("import importlib.metadata as m, json\n"
          "def v(n):\n"
          "    try:\n        return m.version(n)\n"
          "    except m.PackageNotFoundError:\n        return None\n"
          f"print(json.dumps({{n: v(n) for n in {TRAINER_PACKAGES!r}}}))")


def trainer_versions(python: list[str], timeout: float = 120) -> dict[str, str | None]:
    """The OpenHands packages installed where the training command runs: asked of that
    very interpreter (``python`` is its command line, e.g. a venv's python or a
    ``chroot ROOT /env/bin/python``), since the one running imagefarm may differ."""
    import json

    where = shlex.join(python)
    try:
        proc = subprocess.run([*python, "-c", _PROBE], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"--trainer-python {where}: cannot run it ({exc})") from None
    try:
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        return {n: got.get(n) for n in TRAINER_PACKAGES}
    except (ValueError, IndexError, AttributeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"--trainer-python {where}: not a Python that reports its packages "
                          f"(exit {proc.returncode}: {tail[:200]})") from None


@dataclass(frozen=True)
class VersionCheck:
    """The trainer's OpenHands versions against the images the lockfile gives the dataset."""

    python: str                          #: the interpreter's command line, for messages
    trainer: dict[str, str | None]       #: package -> installed version (None: not installed)
    images: dict[str, int]               #: agent-server version -> instances whose image holds it
    problem: str = ""                    #: one paragraph: both versions and the fixing commands

    @property
    def ok(self) -> bool:
        return not self.problem

    @property
    def wanted(self) -> str | None:
        """The version the trainer speaks: its SDK's, else its workspace's, else its server's."""
        return next((self.trainer[n] for n in TRAINER_PACKAGES if self.trainer.get(n)), None)


@dataclass(frozen=True)
class Preflight:
    checked: int
    problems: tuple[Problem, ...] = field(default=())
    versions: VersionCheck | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and (self.versions is None or self.versions.ok)


def check_versions(python: str, trainer: dict[str, str | None], images: dict[str, int], *,
                   rebuild: str, pin_with: str) -> VersionCheck:
    """``problem`` names the trainer's and the images' versions and both fixes: build
    the images at the trainer's version (``rebuild``, the prebuild line without its
    version) or pin the trainer to the images' (``pin_with``: how to run its pip)."""
    have = {n: v for n, v in trainer.items() if v}
    said = ", ".join(f"{n} {v}" for n, v in have.items())
    if not have:
        return VersionCheck(python, trainer, images)  # no OpenHands SDK there (a V0 trainer): nothing to compare
    if len(set(have.values())) > 1:
        newest = max(have.values(), key=version_key)
        pins = " ".join(f"{n}=={newest}" for n in have)
        return VersionCheck(python, trainer, images, (
            f"the trainer ({python}) mixes versions: {said}; they are released together and must be equal: "
            f"`{pin_with} {pins}`"))
    want = next(iter(have.values()))
    other = {v: n for v, n in images.items() if v != want}
    if not other:
        return VersionCheck(python, trainer, images)
    shown = ", ".join(f"{v} ({n} instance{'s' if n != 1 else ''})" for v, n in other.items())
    pin = max(other, key=lambda v: (other[v], version_key(v)))
    pins = " ".join(f"{n}=={pin}" for n in have)
    return VersionCheck(python, trainer, images, (
        f"the trainer ({python}) has {said}, but the lockfile's images hold openhands-agent-server {shown}: "
        f"build the images at the trainer's version: `{rebuild} --agent-server-version {want}`, "
        f"or pin the trainer to the images': `{pin_with} {pins}`"))


def preflight(cat: Catalog, lock: Lockfile, *, recipe_digest: str | None = None, to: str, recipe: Any = None,
              exists=None, require_verified: bool = True, trainer: dict[str, str | None] | None = None,
              python: str = "python", rebuild: str = "imagefarm prebuild ...", verified=None) -> Preflight:
    """Check every instance; ``exists(entry) -> bool`` asks the registry (optional).

    ``recipe`` (a ``Recipe``): each image's recipe digest must be that recipe's at the
    image's own version (``recipe_digest``: one fixed digest instead). ``trainer``
    (``trainer_versions`` of ``python``): each instance must have an image at the
    trainer's version; the ``versions`` answer names both sides and the fixes.
    ``verified(entry) -> bool`` (optional) asks the registry for a signed verification
    record: the lockfile's own ``verified`` is a hint, not proof."""
    problems: list[Problem] = []
    seen_digest: dict[str, bool] = {}
    seen_record: dict[str, bool] = {}
    name = getattr(recipe, "name", None)
    want = VersionCheck(python, trainer, {}).wanted if trainer else None
    images: dict[str, int] = {}
    for inst in cat.instances:
        base = str(inst.base)
        entry = None
        if want:  # the trainer's version first; another one is a problem below
            entry = (lock.for_instance(inst.instance_id, recipe=name, version=want)
                     or lock.for_base(inst.base, recipe=name, version=want))
        entry = entry or lock.for_instance(inst.instance_id, recipe=name) or lock.for_base(inst.base, recipe=name)
        if entry is not None:
            images[entry.agent_server_version] = images.get(entry.agent_server_version, 0) + 1
            if want and entry.agent_server_version != want:
                problems.append(Problem(inst.instance_id, base, "other-version", build_command(base, to, want)))
                continue
        fix = build_command(base, to, entry.agent_server_version if entry else want)
        if entry is None:
            problems.append(Problem(inst.instance_id, base, "missing", fix))
            continue
        if recipe is not None:
            expected = recipe.at_version(entry.agent_server_version).digest
        else:
            expected = recipe_digest
        if expected and entry.recipe_digest != expected:
            problems.append(Problem(inst.instance_id, base, "stale-recipe", fix))
            continue
        if require_verified and verified is not None and entry.verified:
            if entry.image_digest not in seen_record:
                seen_record[entry.image_digest] = bool(verified(entry))
            if not seen_record[entry.image_digest]:
                problems.append(Problem(inst.instance_id, base, "unverified", f"imagefarm verify {entry.pinned}"))
                continue
        if require_verified and not entry.verified:
            problems.append(Problem(inst.instance_id, base, "unverified", f"imagefarm verify {entry.pinned}"))
            continue
        if exists is not None:
            if entry.image_digest not in seen_digest:
                seen_digest[entry.image_digest] = bool(exists(entry))
            if not seen_digest[entry.image_digest]:
                problems.append(Problem(inst.instance_id, base, "gone-from-registry", fix))
    versions = None
    if trainer:
        versions = check_versions(python, trainer, dict(sorted(images.items(), key=lambda kv: version_key(kv[0]))),
                                  rebuild=rebuild, pin_with=f"{python} -m pip install")
    return Preflight(len(cat.instances), tuple(problems), versions)


def trainer_python_of(train_cmd: list[str]) -> list[str] | None:
    """The interpreter a training command runs (``python -m ...``, ``/venv/bin/python3 x.py``), or None."""
    return [train_cmd[0]] if train_cmd and re.fullmatch(r"python[0-9.]*", Path(train_cmd[0]).name) else None


def registry_exists(client) -> Any:
    """An ``exists`` callable for ``preflight`` backed by manifest HEADs."""
    def exists(entry: Entry) -> bool:
        return client.head_manifest(parse(entry.pinned)) is not None
    return exists


def registry_verified(client) -> Any:
    """A ``verified`` callable for ``preflight``: a verification record signed by a
    trusted key beside the pinned image (an unsigned one is no record)."""
    from imagefarm.farm import attest

    def verified(entry: Entry) -> bool:
        ref = parse(entry.pinned)
        return attest.is_verified(client, ref, entry.image_digest)
    return verified


# -- dataset rewrite -----------------------------------------------------------------------
def _pin_row(row: dict[str, Any], lock: Lockfile, version: str | None = None) -> tuple[dict[str, Any], bool]:
    try:
        image, iid, _ = image_of(row)
    except ImagefarmError:
        return row, False
    if not image:
        return row, False
    entry = lock.for_instance(iid, version=version) if iid else None
    entry = entry or lock.for_base(parse(image), version=version)
    if entry is None:
        return row, False
    row = dict(row)
    inst = row.get("instance")
    if isinstance(inst, dict):
        inst = dict(inst)
        if "image_name" in inst:
            inst["image_name"] = entry.pinned
        elif "docker_image" in inst:
            inst["docker_image"] = entry.pinned
        else:
            inst["instance_id"] = entry.pinned
        row["instance"] = inst
    for col in ("docker_image", "image", "image_name"):
        if row.get(col):
            row[col] = entry.pinned
    return row, True


def rewrite_dataset(spec: str, lock: Lockfile, out_dir: Path, *, version: str | None = None) -> list[tuple[Path, int, int]]:
    """Copy every parquet file of ``spec`` into ``out_dir`` with images pinned (those
    at agent-server ``version``, the trainer's; None: each instance's newest verified).

    Returns (file, rows, rows pinned). Rows the lockfile lacks are kept as they are;
    ``preflight`` is what refuses to launch with them.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in resolve_files(spec):
        if path.suffix != ".parquet":
            continue
        table = pq.read_table(path)
        rows, pinned = [], 0
        for row in table.to_pylist():
            new, ok = _pin_row(row, lock, version)
            rows.append(new)
            pinned += ok
        out = out_dir / path.name
        tmp = out.with_suffix(".parquet.tmp")
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), tmp)
        tmp.replace(out)
        written.append((out, len(rows), pinned))
    if not written:
        raise ConfigError(f"{spec}: no parquet files to rewrite (SkyRL reads parquet)")
    return written


# -- environment ------------------------------------------------------------------------------
def env_file(path: Path, values: Mapping[str, str]) -> Path:
    """Write ``export K=V`` lines (shell-quoted), readable by bash and by ``read_env_file``."""
    lines = ["# written by imagefarm launch: source it in the training job"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in values.items()]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.chmod(tmp, 0o600)  # it holds an API key
    tmp.replace(path)
    return path


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line.startswith("export "):
            k, _, v = line[7:].partition("=")
            out[k] = shlex.split(v)[0] if v else ""
    return out


def ray_env(runtime_env: MutableMapping[str, Any] | None = None, names: Iterable[str] = RUNTIME_ENV_VARS,
            environ: Mapping[str, str] | None = None) -> MutableMapping[str, Any]:
    """Copy the runtime variables into a Ray ``runtime_env`` (e.g. SkyRL's
    ``PPO_RAY_RUNTIME_ENV``) so every Ray worker sees them. Returns the same mapping."""
    environ = os.environ if environ is None else environ
    runtime_env = {} if runtime_env is None else runtime_env
    env_vars = runtime_env.setdefault("env_vars", {})
    for name in names:
        if environ.get(name):
            env_vars[name] = environ[name]
    return runtime_env


_INT = re.compile(r"^\d+$")


def remap_cuda_visible_devices(value: str | None) -> str | None:
    """vLLM's MIG check fails on UUIDs (``MIG-...``, ``GPU-...``): within a job's
    allocation the visible devices are simply 0..n-1. Integers stay as they are."""
    if value is None:
        return None
    items = [x.strip() for x in value.split(",") if x.strip()]
    if not items or all(_INT.match(x) for x in items):
        return value
    return ",".join(str(i) for i in range(len(items)))


def apply_mig_fix(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Remap ``CUDA_VISIBLE_DEVICES`` in place (call before vLLM starts)."""
    environ = os.environ if environ is None else environ
    old = environ.get("CUDA_VISIBLE_DEVICES")
    new = remap_cuda_visible_devices(old)
    if new is not None and new != old:
        environ["CUDA_VISIBLE_DEVICES"] = new
    return new


#: the same fix as a shell snippet for job scripts (``imagefarm launch mig-fix`` prints it)
MIG_FIX_SH = (Path(__file__).resolve().parents[1] / "data" / "mig_fix.sh").read_text()



# -- SLURM ------------------------------------------------------------------------------------
DATA = Path(__file__).resolve().parents[1] / "data"


def runtime_job_script() -> Path:
    """runtime/runtime_server.sbatch as installed (package data of imagefarm.runtime, found
    by name: serving never imports the runtime server's code, the runtime imports serving)."""
    return Path(str(importlib.resources.files("imagefarm.runtime") / "runtime_server.sbatch"))


def render_train_job(run_dir: Path) -> Path:
    """The training job script with the MIG fix inlined, written into ``run_dir``."""
    text = (DATA / "train_job.sbatch").read_text().replace("@MIG_FIX@", MIG_FIX_SH.rstrip("\n"))
    out = run_dir / "train_job.sbatch"
    out.write_text(text)
    out.chmod(0o755)
    return out


@dataclass(frozen=True)
class Submission:
    runtime: list[str]
    train: list[str]


def sbatch_commands(run_dir: Path, train_cmd: list[str], *, runtime_args: list[str] = (),
                    train_args: list[str] = (), env: Mapping[str, str] | None = None) -> Submission:
    """The two sbatch command lines: the runtime server (CPU) and training (GPU).

    The training job depends on nothing but the URL file, so it can start first and wait.
    """
    url_file = run_dir / "runtime_url"
    extra = "".join(f",{k}={v}" for k, v in (env or {}).items())
    runtime = ["sbatch", "--parsable", *runtime_args,
               f"--output={run_dir / 'runtime-%j.log'}",
               f"--export=ALL,IMAGEFARM_RUNTIME_URL_FILE={url_file}{extra}", str(runtime_job_script())]
    train = ["sbatch", "--parsable", *train_args, f"--output={run_dir / 'train-%j.log'}",
             f"--export=ALL,IMAGEFARM_RUNTIME_URL_FILE={url_file},IMAGEFARM_TRAIN_ENV={run_dir / 'train.env'}{extra}",
             str(run_dir / "train_job.sbatch"), *train_cmd]
    return Submission(runtime, train)
