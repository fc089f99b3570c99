"""A batch's state on disk: its counts and failures, saved under the state directory as
it runs, so ``imagefarm status`` reports a running, finished or interrupted batch; and
each base's outcome, which the driver folds into those counts."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imagefarm.host.proc import pid_alive
from imagefarm.host.statedir import state_subdir
from imagefarm.settings import Settings


@dataclass
class Outcome:
    base: str
    ok: bool = False
    skipped: bool = False
    image: str = ""
    digest: str = ""
    base_digest: str = ""
    verified: bool | None = None   #: None: not checked in this batch
    verify_skipped: bool = False
    error: str = ""
    stage: str = "derive"


@dataclass
class BatchState:
    batch_id: str
    dataset: str
    to: str
    recipe: str
    executor: str
    total: int
    pid: int = field(default_factory=os.getpid)
    started: float = field(default_factory=time.time)
    finished: float | None = None
    status: str = "running"        #: running, finished, interrupted, failed
    derived: int = 0
    skipped: int = 0
    failed: int = 0
    verified: int = 0
    verify_failed: int = 0
    bad_rows: int = 0
    resubmitted: int = 0           #: tasks the driver asked for again after a stall (last resort)
    redelivered: int = 0           #: tasks the broker delivered more than once (a worker was lost)
    extra_deliveries: int = 0      #: deliveries beyond the first (and beyond a task's own retries)
    failures: list[dict[str, str]] = field(default_factory=list)
    #: re-layering groups derived plainly instead: {"group": first base, "bases": n, "reason": ...}
    relayer_fallbacks: list[dict[str, Any]] = field(default_factory=list)
    relayer_mtime_differs: int = 0  #: re-layered paths whose mtime is not their base's (derive.relayer)
    lockfile: str = ""

    @property
    def done(self) -> int:
        return self.derived + self.skipped + self.failed


def batches_dir(settings: Settings) -> Path:
    return Path(settings.state_dir) / "batches"


def save_state(settings: Settings, state: BatchState) -> None:
    d = batches_dir(settings)
    state_subdir(d.parent, d.name)
    tmp = d / f".{state.batch_id}.tmp"
    tmp.write_text(json.dumps(asdict(state), indent=1))
    tmp.replace(d / f"{state.batch_id}.json")
    (d / "latest").write_text(state.batch_id)


def load_state(settings: Settings, batch_id: str | None = None) -> BatchState | None:
    d = batches_dir(settings)
    state_subdir(d.parent, d.name)  # a planted batch state is refused like any other
    try:
        batch_id = batch_id or (d / "latest").read_text().strip()
        state = BatchState(**json.loads((d / f"{batch_id}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if state.status == "running" and not pid_alive(state.pid):
        state.status = "interrupted"
    return state



def apply(state: BatchState, o: Outcome, stage: str, res: dict[str, Any]) -> None:
    """Fold one task's answer (``stage`` derive or verify) into the base's outcome and the
    batch's counts."""
    if stage == "derive":
        if res.get("ok"):
            o.ok, o.skipped = True, bool(res.get("skipped"))
            o.image, o.digest, o.base_digest = res["image"], res["digest"], res["base_digest"]
            if o.skipped:
                state.skipped += 1
            else:
                state.derived += 1
        else:
            o.ok, o.error, o.stage = False, res.get("error", "unknown error"), "derive"
            state.failed += 1
            state.failures.append({"base": o.base, "stage": "derive", "reason": o.error})
    else:
        o.verified = bool(res.get("verified"))
        o.verify_skipped = bool(res.get("skipped"))
        if o.verified:
            state.verified += 1
        else:
            o.error, o.stage = res.get("error", "verify failed"), "verify"
            state.verify_failed += 1
            state.failures.append({"base": o.base, "stage": "verify", "reason": o.error})
