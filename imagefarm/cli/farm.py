"""``imagefarm prebuild``, ``imagefarm status`` and ``imagefarm worker``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from imagefarm.farm.batchstate import BatchState, load_state
from imagefarm.farm.prebuild import BatchConfig, run_batch
from imagefarm.payload.recipe import recipe_for
from imagefarm.settings import Settings
from ._app import app, console, emit_json, friendly, option, out
from .payload import version_option


@app.command()
@friendly
def prebuild(
    dataset: str = typer.Option(..., "--dataset", "-d", help="hub id (R2E-Gym/R2E-Gym-Subset), parquet/jsonl/txt file or directory"),
    to: Optional[str] = typer.Option(None, help="registry prefix for prebuilt images (IMAGEFARM_TO)"),
    recipe: Optional[list[str]] = typer.Option(
        None, help="recipe name or path (IMAGEFARM_RECIPE); repeat for several recipes in one run "
                   "(--recipe default --recipe v0): one batch per recipe, one after the other"),
    agent_server_version: Optional[str] = version_option(),
    executor: str = option(BatchConfig, "executor"),
    limit: Optional[int] = option(BatchConfig, "limit", min=1),
    lockfile: Optional[Path] = typer.Option(None, help="write instance -> base@digest -> prebuilt@digest here"),
    verify: str = option(BatchConfig, "verify"),
    workers: int = option(BatchConfig, "workers", min=1),
    verify_timeout: float = option(BatchConfig, "verify_timeout"),
    broker_url: Optional[str] = typer.Option(None, help="celery executor: Redis URL (IMAGEFARM_BROKER_URL)"),
    payload_from: Optional[str] = typer.Option(
        None, "--payload-from", metavar="PREFIX",
        help="registry prefix holding the payload when neither the cache nor --to has it (IMAGEFARM_PAYLOAD_FROM)"),
    json_out: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    plan: bool = typer.Option(False, "--plan", help="print what the batch would do and cost; write nothing"),
    bandwidth: str = typer.Option("100MB/s", help="--plan: the copy's bandwidth for the time estimate"),
    relayer: bool = typer.Option(False, "--relayer",
                                 help="re-layer the bases of each repository together: their shared files "
                                      "are pulled once (one common layer, a small layer per image); with "
                                      "--plan: the bytes each group would store and pull per sibling"),
) -> None:
    """Turn every base image of a dataset into a verified agent-server image.

    Interrupt with Ctrl-C and run again: finished images are not redone.
    """
    BatchConfig(executor, limit, verify, workers, verify_timeout)  # a bad value: one line, exit 2
    recipes = list(dict.fromkeys(recipe or [None]))
    if len(recipes) > 1 and agent_server_version:
        raise typer.BadParameter("--agent-server-version names one recipe's version: give one --recipe with it")
    runs = [Settings.load(to=to, recipe=r, broker_url=broker_url, payload_from=payload_from,
                          agent_server_version=agent_server_version) for r in recipes]
    for settings in runs:  # every recipe named is checked before the first batch starts
        recipe_for(settings)
    states = []
    for settings in runs:
        if plan:
            _plan(settings, dataset, limit, bandwidth, workers, json_out, relayer)
            continue
        states.append(_prebuild(settings, dataset, executor, limit, verify, lockfile, workers, verify_timeout,
                                 relayer))
    if plan:
        return
    if json_out:
        docs = [{**st.__dict__, "done": st.done} for st in states]
        emit_json(docs[0] if len(docs) == 1 else {"batches": docs})
    else:
        for st in states:
            _summary(st)
    if any(st.failed or st.verify_failed for st in states):
        raise typer.Exit(1)


def _prebuild(settings: Settings, dataset: str, executor: str, limit: int | None, verify: str,
              lockfile: Path | None, workers: int, verify_timeout: float, relayer: bool) -> BatchState:
    """One recipe's batch with its progress line (the lockfile keeps each recipe's entries apart)."""
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[counts]}"), TextColumn("{task.fields[rate]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
    task_id = None
    t0 = time.monotonic()
    pauses = _Pauses(settings, executor)

    def on_progress(state: BatchState) -> None:
        nonlocal task_id
        if task_id is None:
            task_id = progress.add_task("prebuild", total=state.total, counts="", rate="")
        rate = state.done / max(time.monotonic() - t0, 1e-9)
        paused = pauses.poll(lambda line: progress.console.print(line, markup=False, highlight=False))
        progress.update(task_id, completed=state.done, rate=f"{rate:.1f} img/s" + "".join(
            f"  [{p}]" for p in paused), counts=(
            f"derived {state.derived} skipped {state.skipped} failed {state.failed} "
            f"verified {state.verified}" + (f" verify-failed {state.verify_failed}" if state.verify_failed else "")))

    try:
        with progress:
            result = run_batch(settings, dataset, executor=executor, limit=limit, verify=verify,
                               lockfile=lockfile, workers=workers, verify_timeout=verify_timeout,
                               on_progress=on_progress, log=lambda m: console.print(m, highlight=False),
                               relayer=relayer)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: run the same command again to resume; finished images are kept")
        raise typer.Exit(130)
    return result.state


def _plan(settings: Settings, dataset: str, limit: int | None, bandwidth: str, workers: int,
          json_out: bool, relayer: bool = False) -> None:
    import threading

    from imagefarm.farm.plan import make_plan, parse_bandwidth, render

    rate = parse_bandwidth(bandwidth)
    pauses = _Pauses(settings, "local")
    got: dict = {}

    def work() -> None:
        try:
            got["plan"] = make_plan(settings, dataset, limit=limit, bandwidth=rate, workers=workers,
                                    relayer=relayer)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the command's thread
            got["error"] = exc

    t = threading.Thread(target=work, daemon=True)
    t.start()
    while t.is_alive():  # a plan that spends a pull budget waits, and says so
        t.join(0.5)
        pauses.poll(lambda line: console.print(line, markup=False, highlight=False))
    if "error" in got:
        raise got["error"]
    p = got["plan"]
    if json_out:
        emit_json(p.to_json())
    else:
        for line in render(p):
            out.print(line, markup=False, highlight=False)


class _Pauses:
    """Rate-limit pauses for the progress line: each pause is also said once as a line
    when it begins (a log read later shows when and why the batch waited)."""

    def __init__(self, settings: Settings, executor: str) -> None:
        self.settings, self.executor = settings, executor
        self._said: dict[tuple[str, str], int] = {}
        self._next = 0.0
        self._gate = None
        self._last: list[str] = []

    def poll(self, say) -> list[str]:
        now = time.monotonic()
        if now < self._next:
            return self._last
        self._next = now + 0.5
        if self._gate is None:
            from imagefarm.registry import ratelimit

            if self.executor == "celery":
                from imagefarm.worker.ratelimit import RedisGate

                self._gate = RedisGate.from_url(self.settings.broker)
            else:
                self._gate = ratelimit.current()
        try:
            states = [s for s in self._gate.status() if s.paused()]
        except Exception:  # noqa: BLE001 - a progress line never stops a batch
            states = []
        for s in states:
            if self._said.get((s.registry, s.account)) != round(s.paused_until):
                self._said[(s.registry, s.account)] = round(s.paused_until)
                say(s.line())
        self._last = [s.line() for s in states]
        return self._last


def _summary(state: BatchState) -> None:
    secs = (state.finished or time.time()) - state.started
    out.print(f"batch {state.batch_id}: {state.total} bases, derived {state.derived}, already done "
              f"{state.skipped}, failed {state.failed}, verified {state.verified}, verify failed "
              f"{state.verify_failed}, bad rows {state.bad_rows} in {secs:.1f}s")
    if state.executor == "celery":
        out.print(f"repeated work: {state.redelivered} task(s) delivered again by the broker "
                  f"({state.extra_deliveries} extra deliveries, after a lost worker), {state.resubmitted} "
                  f"asked again by the driver after a stall")
    if state.lockfile:
        out.print(f"lockfile: {state.lockfile}")
    if state.relayer_mtime_differs:
        out.print(f"re-layering: {state.relayer_mtime_differs} path(s) carry another mtime than their base's "
                  "(where a group's images disagree, the one most hold)")
    for f in state.relayer_fallbacks:
        out.print(f"re-layering fell back to plain derive for the {f['bases']} bases of {f['group']}: "
                  f"{f['reason'][:500]}", markup=False, highlight=False)
    if state.failures:
        out.print(f"[bold red]failures[/] ({len(state.failures)}):")
        for f in state.failures[:200]:
            out.print(f"  {f['base']}  [{f['stage']}]  {f['reason'][:500]}", markup=False, highlight=False)
        if len(state.failures) > 200:
            out.print(f"  ... and {len(state.failures) - 200} more (imagefarm status --json)")


@app.command()
@friendly
def status(batch: Optional[str] = typer.Argument(None, help="batch id (default: the latest)"),
           json_out: bool = typer.Option(False, "--json")) -> None:
    """Report a running or finished prebuild batch."""
    state = load_state(Settings.load(), batch)
    if state is None:
        console.print("no batch found: start one with `imagefarm prebuild --dataset ...`")
        raise typer.Exit(1)
    if json_out:
        emit_json({**state.__dict__, "done": state.done})
        return
    out.print(f"[bold]{state.status}[/] {state.done}/{state.total} ({state.executor}, dataset {state.dataset})")
    _summary(state)


@app.command()
@friendly
def worker(
    queues: str = typer.Option("derive,verify", help="queues to consume: derive (no podman needed), verify"),
    concurrency: int = typer.Option(max(2, os.cpu_count() or 2), help="parallel tasks in this worker"),
    broker_url: Optional[str] = typer.Option(None, help="Redis URL (IMAGEFARM_BROKER_URL)"),
    loglevel: str = typer.Option("INFO"),
    hostname: Optional[str] = typer.Option(None, "--hostname", "-n", help="worker node name (celery -n), e.g. w1@%h"),
) -> None:
    """Start a Celery worker for the farm (on a CPU node; see worker/README.md for SLURM).

    The Celery worker runs as a child and is started again if it exits (broker loss can
    end it); each exit code is logged. Ctrl-C or SIGTERM stops it (warm shutdown).
    """
    if broker_url:
        os.environ["IMAGEFARM_BROKER_URL"] = broker_url
    import imagefarm.worker.app  # noqa: F401 - bad settings end here, in one line, not in a restart loop
    from imagefarm.worker.supervise import celery_argv, supervise

    code = supervise(celery_argv(queues, concurrency, loglevel, hostname),
                     log=lambda m: console.print(f"imagefarm worker: {m}", highlight=False))
    raise typer.Exit(code)
