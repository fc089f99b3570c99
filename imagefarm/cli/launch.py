"""``imagefarm launch ...``: preflight, prepare, env, mig-fix."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from imagefarm.serve import launch as L
from imagefarm.farm.catalog import load
from imagefarm.farm.lockfile import Lockfile
from imagefarm.errors import ConfigError
from imagefarm.settings import Settings
from ._app import app, console, emit_json, friendly, out

launch_app = typer.Typer(help="Launch training with prebuilt images (SkyRL + verl, SLURM, MIG).",
                         no_args_is_help=True)
app.add_typer(launch_app, name="launch")


@launch_app.command("preflight")
@friendly
def preflight_cmd(
    dataset: str = typer.Option(..., "--dataset", "-d", help="training dataset (dir with train/validation parquet, file or hub id)"),
    lockfile: Path = typer.Option(..., help="lockfile written by `imagefarm prebuild --lockfile`"),
    to: Optional[str] = typer.Option(None, help="registry prefix (IMAGEFARM_TO), for the build commands"),
    recipe: Optional[str] = typer.Option(None, help="recipe the images must be built with (IMAGEFARM_RECIPE)"),
    check_registry: bool = typer.Option(True, help="also check each pinned digest is still in the registry"),
    allow_unverified: bool = typer.Option(False, help="accept images that were built but not boot-checked"),
    trainer_python: Optional[str] = typer.Option(
        None, "--trainer-python", metavar="CMD",
        help="the interpreter the training command runs (e.g. /venv/bin/python): its openhands-sdk, "
             "openhands-workspace and openhands-agent-server must match the images' version"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Every training and validation instance has a verified prebuilt image (at the
    trainer's OpenHands version, with --trainer-python); exit 1 if not."""
    from imagefarm.payload.recipe import recipe_for

    settings = Settings.load(to=to, recipe=recipe)
    cat, lock = load(dataset), Lockfile.read(lockfile)
    python = _python_argv(trainer_python)
    trainer = L.trainer_versions(python) if python else None
    exists = None
    client = None
    if check_registry:
        from imagefarm.registry import RegistryClient

        client = RegistryClient(settings)
        exists = L.registry_exists(client)
    try:
        res = L.preflight(cat, lock, recipe=recipe_for(settings), to=settings.to, exists=exists,
                          verified=L.registry_verified(client) if client else None,
                          require_verified=not allow_unverified, trainer=trainer,
                          python=shlex.join(python or ["python"]),
                          rebuild=_rebuild(dataset, settings.to, lockfile))
    finally:
        if client:
            client.close()
    if json_out:
        v = res.versions
        emit_json({"ok": res.ok, "checked": res.checked, "problems": [p.__dict__ for p in res.problems],
                   **({} if v is None else {"versions": {"python": v.python, "trainer": v.trainer,
                                                          "images": v.images, "ok": v.ok, "problem": v.problem}})})
    else:
        for p in res.problems[:500]:
            out.print(f"{p.reason:18} {p.base}  ->  {p.fix}", markup=False, highlight=False)
        if len(res.problems) > 500:
            out.print(f"... and {len(res.problems) - 500} more (--json lists all)")
        _print_versions(res.versions, trainer_python)
        msg = f"{res.checked} instances checked, {len(res.problems)} without a usable prebuilt image"
        console.print(("[green]ready:[/] " if res.ok else "[red]not ready:[/] ") + msg)
    if not res.ok:
        raise typer.Exit(1)


def _python_argv(cmd: str | None) -> list[str] | None:
    if cmd is None:
        return None
    try:
        argv = shlex.split(cmd)
    except ValueError as exc:
        raise ConfigError(f"--trainer-python {cmd!r}: {exc}") from None
    if not argv:
        raise ConfigError("--trainer-python: empty command")
    return argv


def _rebuild(dataset: str, to: str, lockfile: Path) -> str:
    """The prebuild line that (re)builds this dataset's images into this lockfile."""
    return shlex.join(["imagefarm", "prebuild", "--dataset", dataset, "--to", to, "--lockfile", str(lockfile)])


def _print_versions(v, asked: str | None) -> None:
    if v is None:
        if asked is None:
            console.print("OpenHands versions not compared: give --trainer-python (the training command's interpreter)")
        return
    have = ", ".join(f"{n} {x}" for n, x in v.trainer.items() if x) or "no OpenHands SDK"
    images = ", ".join(f"{x} ({n})" for x, n in v.images.items()) or "none"
    console.print(f"trainer {v.python}: {have}; images: openhands-agent-server {images}", highlight=False,
                  soft_wrap=True)
    if v.problem:
        console.print(f"[red]version mismatch:[/] {escape(v.problem)}", highlight=False, soft_wrap=True)


@launch_app.command("prepare")
@friendly
def prepare_cmd(
    dataset: str = typer.Option(..., "--dataset", "-d", help="SkyRL parquet dataset (dir or file)"),
    lockfile: Path = typer.Option(..., help="lockfile written by `imagefarm prebuild --lockfile`"),
    out_dir: Path = typer.Option(..., "--out", help="where the pinned dataset and train.env go"),
    runtime_url: Optional[str] = typer.Option(None, help="runtime server URL (else read later from --url-file)"),
    api_key: Optional[str] = typer.Option(None, envvar="ALLHANDS_API_KEY", help="runtime server API key"),
) -> None:
    """Write the dataset with images pinned by digest, and the env file for training."""
    lock = Lockfile.read(lockfile)
    for path, rows, pinned in L.rewrite_dataset(dataset, lock, out_dir):
        out.print(f"{path}: {pinned}/{rows} rows pinned", highlight=False)
    values = {"IMAGEFARM_LOCKFILE": str(Path(lockfile).resolve()), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    if runtime_url:
        values["SANDBOX_REMOTE_RUNTIME_API_URL"] = runtime_url
    if api_key:
        values["ALLHANDS_API_KEY"] = api_key
    env = L.env_file(out_dir / "train.env", values)
    out.print(f"{env}: {', '.join(values)}", highlight=False)


@launch_app.command("mig-fix")
def mig_fix_cmd() -> None:
    """Print the shell snippet that remaps MIG/GPU UUIDs in CUDA_VISIBLE_DEVICES (source it)."""
    typer.echo(L.MIG_FIX_SH, nl=False)


@launch_app.command("sbatch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@friendly
def sbatch_cmd(
    ctx: typer.Context,
    dataset: str = typer.Option(..., "--dataset", "-d", help="SkyRL parquet dataset (dir or file)"),
    lockfile: Path = typer.Option(..., help="lockfile written by `imagefarm prebuild --lockfile`"),
    run_dir: Path = typer.Option(..., help="shared directory for the pinned dataset, env file, URL file, logs"),
    to: Optional[str] = typer.Option(None, help="registry prefix (IMAGEFARM_TO)"),
    runtime_arg: list[str] = typer.Option([], "--runtime-sbatch-arg", help="extra sbatch flag for the runtime job (repeat)"),
    train_arg: list[str] = typer.Option([], "--train-sbatch-arg", help="extra sbatch flag for the training job (repeat)"),
    api_key: Optional[str] = typer.Option(None, envvar="ALLHANDS_API_KEY", help="runtime API key (default: generated)"),
    skip_preflight: bool = typer.Option(False, help="launch even if some instance has no verified image"),
    prefetch_first: int = typer.Option(64, "--prefetch-first", help="images of the first N instances the "
                                                                    "runtime job pulls onto its nodes as it "
                                                                    "starts (0: none)"),
    trainer_python: Optional[str] = typer.Option(
        None, "--trainer-python", metavar="CMD",
        help="the training command's interpreter, for the version check (default: the command's own "
             "python, if it starts with one)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print what would be submitted, submit nothing"),
) -> None:
    """Submit the runtime-server job (CPU) and the training job (GPU); the training
    command follows `--`, e.g. `-- python -m skyrl_train.entrypoints.main_base ...`."""
    import json
    import secrets
    import shlex
    import subprocess

    from imagefarm.payload.recipe import recipe_for

    if prefetch_first < 0:
        raise ConfigError("--prefetch-first must be 0 or more")
    settings = Settings.load(to=to)
    train_cmd = list(ctx.args) or ["bash", "-c", "echo 'no training command given after --' >&2; exit 2"]
    lock = Lockfile.read(lockfile)
    python = _python_argv(trainer_python)
    trainer = L.trainer_versions(python) if python else None
    if python is None and (python := L.trainer_python_of(train_cmd)):
        try:  # the command's own python may exist only on the compute nodes: then unchecked, said so
            trainer = L.trainer_versions(python)
        except ConfigError as exc:
            console.print(f"[yellow]OpenHands versions not compared:[/] {escape(str(exc))} (give --trainer-python)",
                          highlight=False, soft_wrap=True)
            python = None
    version = L.VersionCheck("", trainer, {}).wanted if trainer else None
    if not skip_preflight:
        res = L.preflight(load(dataset), lock, recipe=recipe_for(settings), to=settings.to, trainer=trainer,
                          python=shlex.join(python or ["python"]), rebuild=_rebuild(dataset, settings.to, lockfile))
        if not res.ok:
            for p in res.problems[:50]:
                out.print(f"{p.reason:18} {p.base}  ->  {p.fix}", markup=False, highlight=False)
            _print_versions(res.versions, "")
            console.print(f"[red]not ready:[/] {len(res.problems)} of {res.checked} instances lack a usable "
                          "image (run `imagefarm launch preflight` for all; --skip-preflight to launch anyway)")
            raise typer.Exit(1)
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    key = api_key or secrets.token_urlsafe(32)
    L.rewrite_dataset(dataset, lock, run_dir / "data", version=version)
    L.env_file(run_dir / "train.env", {"ALLHANDS_API_KEY": key, "SANDBOX_API_KEY": key,
                                       "IMAGEFARM_LOCKFILE": str(Path(lockfile).resolve()),
                                       "IMAGEFARM_DATASET": str(run_dir / "data"),
                                       "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    L.render_train_job(run_dir)
    job_env = {"IMAGEFARM_TO": settings.to}
    if prefetch_first:
        job_env.update(RUNTIME_PREFETCH_DATASET=str(run_dir / "data"), RUNTIME_PREFETCH_FIRST=str(prefetch_first))
    sub = L.sbatch_commands(run_dir, train_cmd, runtime_args=list(runtime_arg), train_args=list(train_arg),
                            env=job_env)
    runtime_env = {"IMAGEFARM_RUNTIME_API_KEY": key}
    if dry_run:
        out.print(f"# pinned dataset: {run_dir / 'data'}; env file: {run_dir / 'train.env'}", highlight=False)
        out.print("IMAGEFARM_RUNTIME_API_KEY=<from train.env> " + shlex.join(sub.runtime), highlight=False)
        out.print(shlex.join(sub.train), highlight=False)
        return
    ids = {}
    for name, argv, extra in (("runtime", sub.runtime, runtime_env), ("train", sub.train, {})):
        proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **extra})
        if proc.returncode != 0:
            console.print(f"[red]sbatch of the {name} job failed:[/] {proc.stderr.strip()}")
            raise typer.Exit(1)
        ids[name] = proc.stdout.strip().split(";")[0]
        out.print(f"{name} job {ids[name]}", highlight=False)
    (run_dir / "jobs.json").write_text(json.dumps(ids) + "\n")
