"""``imagefarm launch ...``: preflight, prepare, env, mig-fix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

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
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Every training and validation instance has a verified prebuilt image; exit 1 if not."""
    from imagefarm.payload.recipe import recipe_for

    settings = Settings.load(to=to, recipe=recipe)
    cat, lock = load(dataset), Lockfile.read(lockfile)
    exists = None
    client = None
    if check_registry:
        from imagefarm.registry import RegistryClient

        client = RegistryClient(settings)
        exists = L.registry_exists(client)
    try:
        res = L.preflight(cat, lock, recipe_digest=recipe_for(settings).digest, to=settings.to, exists=exists,
                          require_verified=not allow_unverified)
    finally:
        if client:
            client.close()
    if json_out:
        emit_json({"ok": res.ok, "checked": res.checked, "problems": [p.__dict__ for p in res.problems]})
    else:
        for p in res.problems[:500]:
            out.print(f"{p.reason:18} {p.base}  ->  {p.fix}", markup=False, highlight=False)
        if len(res.problems) > 500:
            out.print(f"... and {len(res.problems) - 500} more (--json lists all)")
        msg = f"{res.checked} instances checked, {len(res.problems)} without a usable prebuilt image"
        console.print(("[green]ready:[/] " if res.ok else "[red]not ready:[/] ") + msg)
    if not res.ok:
        raise typer.Exit(1)


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
    if not skip_preflight:
        res = L.preflight(load(dataset), lock, recipe_digest=recipe_for(settings).digest, to=settings.to)
        if not res.ok:
            for p in res.problems[:50]:
                out.print(f"{p.reason:18} {p.base}  ->  {p.fix}", markup=False, highlight=False)
            console.print(f"[red]not ready:[/] {len(res.problems)} of {res.checked} instances lack a usable "
                          "image (run `imagefarm launch preflight` for all; --skip-preflight to launch anyway)")
            raise typer.Exit(1)
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    key = api_key or secrets.token_urlsafe(32)
    L.rewrite_dataset(dataset, lock, run_dir / "data")
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
