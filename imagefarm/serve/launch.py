"""The last mile: training runs exactly the prebuilt images the lockfile pins.

* ``preflight``: every training and validation instance has a verified prebuilt
  image under the current recipe, still present in the registry;
* ``rewrite_dataset``: a copy of SkyRL's parquet whose image fields point at the
  pinned prebuilt references (SkyRL reads ``instance.instance_id`` for R2E rows);
* ``env_file``: what the training job exports (runtime URL and key);
* ``ray_env`` and ``remap_cuda_visible_devices``: helpers a training entry point
  imports (Ray ``runtime_env`` propagation; the MIG UUID fix before vLLM starts).
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, MutableMapping

from imagefarm.farm.catalog import Catalog, image_of, resolve_files
from imagefarm.errors import ConfigError, ImagefarmError
from imagefarm.farm.lockfile import Entry, Lockfile
from .lookup import build_command
from imagefarm.names.reference import parse

RUNTIME_ENV_VARS = ("SANDBOX_REMOTE_RUNTIME_API_URL", "ALLHANDS_API_KEY", "SANDBOX_API_KEY",
                    "IMAGEFARM_LOCKFILE", "LITELLM_LOCAL_MODEL_COST_MAP")


# -- preflight ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    instance_id: str
    base: str
    reason: str           #: missing, unverified, stale-recipe, gone-from-registry
    fix: str


@dataclass(frozen=True)
class Preflight:
    checked: int
    problems: tuple[Problem, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems


def preflight(cat: Catalog, lock: Lockfile, *, recipe_digest: str | None, to: str,
              exists=None, require_verified: bool = True) -> Preflight:
    """Check every instance; ``exists(entry) -> bool`` asks the registry (optional)."""
    problems: list[Problem] = []
    seen_digest: dict[str, bool] = {}
    for inst in cat.instances:
        base = str(inst.base)
        entry = lock.for_instance(inst.instance_id) or lock.for_base(inst.base)
        fix = build_command(base, to)
        if entry is None:
            problems.append(Problem(inst.instance_id, base, "missing", fix))
            continue
        if recipe_digest and entry.recipe_digest != recipe_digest:
            problems.append(Problem(inst.instance_id, base, "stale-recipe", fix))
            continue
        if require_verified and not entry.verified:
            problems.append(Problem(inst.instance_id, base, "unverified", f"imagefarm verify {entry.pinned}"))
            continue
        if exists is not None:
            if entry.image_digest not in seen_digest:
                seen_digest[entry.image_digest] = bool(exists(entry))
            if not seen_digest[entry.image_digest]:
                problems.append(Problem(inst.instance_id, base, "gone-from-registry", fix))
    return Preflight(len(cat.instances), tuple(problems))


def registry_exists(client) -> Any:
    """An ``exists`` callable for ``preflight`` backed by manifest HEADs."""
    def exists(entry: Entry) -> bool:
        return client.head_manifest(parse(entry.pinned)) is not None
    return exists


# -- dataset rewrite -----------------------------------------------------------------------
def _pin_row(row: dict[str, Any], lock: Lockfile) -> tuple[dict[str, Any], bool]:
    try:
        image, iid, _ = image_of(row)
    except ImagefarmError:
        return row, False
    if not image:
        return row, False
    entry = lock.for_instance(iid) if iid else None
    entry = entry or lock.for_base(parse(image))
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


def rewrite_dataset(spec: str, lock: Lockfile, out_dir: Path) -> list[tuple[Path, int, int]]:
    """Copy every parquet file of ``spec`` into ``out_dir`` with images pinned.

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
            new, ok = _pin_row(row, lock)
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
    """runtime/runtime_server.sbatch as installed (package data of imagefarm.runtime)."""
    from imagefarm import runtime

    return Path(runtime.__file__).resolve().parent / "runtime_server.sbatch"


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
