"""Warm sandboxes: agent servers booted ahead of the trainer, handed to matching starts.

The trainer knows its next step's images a step ahead (``POST /prefetch`` with
``warm: K``): a node boots K sandboxes per image then, each with a session key the
server makes, so that a ``/start`` of the same shape is answered with a running,
ready sandbox instead of a boot (the agent server's own 3-5 s).

What "the same shape" is: the resolved (pinned) image and a ``Template``, the parts
of a ``/start`` that change what runs: command, working dir, user (under
``--user-policy requested`` only: otherwise the image's user runs whatever is asked),
resource factor and environment (the agent-server version left out: it chose the
image). A warm sandbox boots with its template's environment (empty for the SDK's
shape) plus its own ``SESSION_API_KEY``, so a start matches only when its environment
is empty or equal. The template of a recipe is the last real ``/start`` of that recipe
this server saw (kept in its 0700 state), else the one its front saw, else the shape
APIRemoteWorkspace sends.

Warm sandboxes hold slots (``placement.admits``, the one rule) but give them up to
real starts first: a real start that finds no free slot has the warm sandboxes it
needs stopped, and its container is created only once theirs are removed. A pool
refills after a hit and expires ``warm_idle_timeout`` after the last prefetch or
hit (or at once when a prefetch of the image asks for ``warm: 0``). ``WarmPool`` is given what it uses (the records, the admission check, and how
to boot and stop a runtime) and keeps the hit and miss counts ``/metrics`` shows.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from .models import StartRequest
from .placement import slots_needed
from .records import Records
from .resolver import VERSION_ENV
from .state import Record, Store

log = logging.getLogger("imagefarm.runtime.warm")


@dataclass(frozen=True)
class Template:
    """The shape of a ``/start`` a warm sandbox can serve."""

    command: tuple[str, ...]
    working_dir: str | None = None
    environment: tuple[tuple[str, str], ...] = ()
    user: tuple[int | None, int | None, int | None] | None = None  #: (run_as_user, run_as_group, fs_group)
    resource_factor: float = 1.0

    @classmethod
    def of(cls, req: StartRequest, argv: list[str], user_policy: str) -> "Template":
        env = tuple(sorted((k, v) for k, v in req.environment.items() if k != VERSION_ENV))
        user = (req.run_as_user, req.run_as_group, req.fs_group) if user_policy == "requested" else None
        return cls(tuple(argv), req.working_dir or None, env, user, float(slots_needed(req.resource_factor)))

    def request(self, image: str, session_id: str) -> StartRequest:
        """The ``/start`` a warm sandbox is booted with."""
        u = self.user or (None, None, None)
        return StartRequest(image=image, command=list(self.command), working_dir=self.working_dir,
                            environment=dict(self.environment), session_id=session_id, run_as_user=u[0],
                            run_as_group=u[1], fs_group=u[2], resource_factor=self.resource_factor)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Template":
        return cls(tuple(d["command"]), d.get("working_dir"), tuple(tuple(x) for x in d.get("environment") or ()),
                   tuple(d["user"]) if d.get("user") else None, float(d.get("resource_factor") or 1.0))


#: what APIRemoteWorkspace sends (openhands-workspace 1.x): the shape before any start was seen
SDK_TEMPLATE = Template(("/usr/local/bin/openhands-agent-server", "--port", "60000"), "/")


def warm_key(image: str, template: Template) -> str:
    """A short stable id of (pinned image, template), kept in a warm record's ``extra``."""
    text = json.dumps([image, template.to_json()], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class Templates:
    """The last real ``/start`` shape per recipe, kept in the server's state."""

    def __init__(self, store: Store, default_recipe: str) -> None:
        self.store, self.default_recipe = store, default_recipe
        raw = json.loads(store.meta("warm_templates") or "{}")
        self._by_recipe = {k: Template.from_json(v) for k, v in raw.items()}

    def learn(self, recipe: str | None, template: Template) -> None:
        name = recipe or self.default_recipe
        if self._by_recipe.get(name) != template:
            self._by_recipe[name] = template
            self.store.set_meta("warm_templates", json.dumps({k: v.to_json() for k, v in self._by_recipe.items()}))

    def get(self, recipe: str | None) -> Template | None:
        """The learned template, or None (the caller decides the fallback)."""
        return self._by_recipe.get(recipe or self.default_recipe)

    def for_recipe(self, recipe: str | None) -> Template:
        return self.get(recipe) or SDK_TEMPLATE


@dataclass
class Target:
    """K warm sandboxes of one (image, template) wanted until ``deadline``."""

    image: str
    template: Template
    count: int
    hit: Any
    deadline: float
    booted: int = 0
    failures: int = 0


@dataclass
class WarmCounts:
    hits: int = 0
    misses: int = 0
    booted: int = 0
    yielded: int = 0
    expired: int = 0


class WarmPool:
    def __init__(self, *, records: Records, templates: Templates, idle_timeout: float,
                 room: Callable[[float], bool],
                 boot: Callable[[StartRequest, Any, str], Record],
                 discard: Callable[[Record, str], asyncio.Task]) -> None:
        """``room(factor)``: whether a warm sandbox fits now; ``boot(request, hit, key)``
        launches one; ``discard(record, why)`` forgets one at once and returns the task
        removing its container."""
        self.records, self.templates, self.idle_timeout = records, templates, idle_timeout
        self.room, self.boot, self.discard = room, boot, discard
        self.targets: dict[str, Target] = {}
        self.counts = WarmCounts()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.removing: set[asyncio.Task] = set()  #: warm containers being removed (a real start waits)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="warm-pool")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self.removing, return_exceptions=True)

    # -- what is warm -------------------------------------------------------------------
    def warm_records(self, key: str | None = None) -> list[Record]:
        return [r for r in self.records.values() if r.extra.get("warm") and (key is None or r.extra["warm"] == key)]

    def by_image(self, *, ready: bool = False) -> dict[str, int]:
        """Live warm sandboxes per pinned image, booting ones too unless ``ready`` (``GET /nodes``)."""
        out: dict[str, int] = {}
        for r in self.warm_records():
            if r.status == "running" and (not ready or r.pod_status == "ready"):
                out[r.prebuilt] = out.get(r.prebuilt, 0) + 1
        return out

    # -- the trainer's foresight ---------------------------------------------------------
    def want(self, hit: Any, image: str, recipe: str | None, count: int, template: Template | None = None) -> int:
        """Keep ``count`` warm sandboxes of ``image`` (pinned) for starts of ``recipe``;
        returns how many are (being) booted for it."""
        # this server's own last start of the recipe, else the one its front saw, else the SDK's
        template = self.templates.get(recipe) or template or SDK_TEMPLATE
        key = warm_key(image, template)
        deadline = time.monotonic() + self.idle_timeout
        if count <= 0:  # none wanted any more: the ones waiting go at the next tick
            if self.targets.pop(key, None) is not None:
                self._wake.set()
            return 0
        t = self.targets.get(key)
        if t is None:
            self.targets[key] = Target(image, template, count, hit, deadline)
        else:
            t.count, t.hit, t.deadline = max(count, t.count), hit, deadline
        self._wake.set()
        return count

    def take(self, image: str, template: Template) -> Record | None:
        """A warm sandbox for a /start of this shape (ready ones first), or None (a miss)."""
        key = warm_key(image, template)
        ready = [r for r in self.warm_records(key) if r.status == "running"]
        ready.sort(key=lambda r: (r.pod_status != "ready", r.created_at))
        if not ready:
            self.counts.misses += 1
            return None
        self.counts.hits += 1
        rec = ready[0]
        del rec.extra["warm"]
        t = self.targets.get(key)
        if t is not None:
            t.deadline = time.monotonic() + self.idle_timeout
        self._wake.set()
        return rec

    def make_room(self, need: Callable[[], bool]) -> list[asyncio.Task]:
        """Stop warm sandboxes until ``need()`` holds (a real start's slot), fewest-wanted
        images first; returns the removals to wait for before that start's container."""
        tasks = []
        victims = sorted(self.warm_records(), key=lambda r: (r.pod_status == "ready", -r.created_at))
        while not need() and victims:
            rec = victims.pop(0)
            self.counts.yielded += 1
            tasks.append(self._remove(rec, "gave its slot to a real start"))
        return tasks

    def _remove(self, rec: Record, why: str) -> asyncio.Task:
        task = self.discard(rec, why)  # forgotten now (its slot is free in the books); the container goes in the task
        self.removing.add(task)
        task.add_done_callback(self.removing.discard)
        return task

    # -- refill and expiry ---------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the pool must not die
                log.exception("warm pool tick failed")

    def tick(self) -> None:
        now = time.monotonic()
        for key, t in list(self.targets.items()):
            if now > t.deadline:
                del self.targets[key]
        for rec in self.warm_records():
            key = rec.extra["warm"]
            if rec.status == "error":
                t = self.targets.get(key)
                if t is not None:
                    t.failures += 1
                    if t.failures >= 3:
                        log.warning("warm sandboxes of %s keep failing (%s): no more are booted", t.image, rec.reason)
                        del self.targets[key]
                self.records.forget(rec.runtime_id)
            elif key not in self.targets:
                self.counts.expired += 1
                self._remove(rec, f"warm sandbox expired (nothing asked for it in {self.idle_timeout:g}s)")
        for key, t in self.targets.items():
            have = len([r for r in self.warm_records(key) if r.status == "running"])
            while have < t.count and self.room(t.template.resource_factor):
                self.boot(t.template.request(t.image, "warm"), t.hit, key)
                self.counts.booted += 1
                t.booted += 1
                have += 1
