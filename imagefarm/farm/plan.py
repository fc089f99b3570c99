"""``imagefarm prebuild --plan``: what a batch would do and cost, before it moves a byte.

Nothing is written to any registry. Per base: HEAD the source tag (public registries
do not count HEAD); if the digest it names already has a derive under the target tag,
the base is done and costs nothing more. Otherwise the manifest is read once (one
counted GET, kept in the manifest cache by digest, so the run that follows reads it
with HEAD only and spends no pull on it), and its layers are checked against the
target registry (HEAD): what is missing is what the run copies, each blob once.

Time: layer and payload bytes at ``bandwidth``, plus the windows a source registry's
pull budget makes the run wait (none, when the plan's cache is where the run reads).

With ``relayer``, each repository's group (as ``prebuild --relayer`` forms them) gets an
estimate of what re-layering stores and what a node pulls for each further sibling
(``GroupPlan``): the lower layers all its bases share are counted from the manifests;
the rest from the file listings of two of its bases (read from their layers).
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from imagefarm import oci
from imagefarm.derive.append import PAYLOAD_REPO, existing_derive
from imagefarm.derive.surgery import check_base
from imagefarm.errors import ConfigError, ImagefarmError
from imagefarm.names.reference import Prefix, Reference
from imagefarm.names.tags import derived_reference
from imagefarm.registry import RegistryClient, ratelimit
from imagefarm.settings import Settings

if TYPE_CHECKING:
    from .relayerplan import GroupPlan

from .catalog import load

_BANDWIDTH = re.compile(r"([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)(B|b|bit|bps)?(/s)?")


def parse_bandwidth(text: str) -> float:
    """Bytes per second from ``100MB/s``, ``1Gbit/s``, ``800Mbps``, ``50MiB/s`` or a
    plain number of bytes per second (``B`` bytes, ``b``/``bit``/``bps`` bits)."""
    m = _BANDWIDTH.fullmatch(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--bandwidth {text!r}: expected a rate such as 100MB/s, 1Gbit/s or 800Mbps")
    n, prefix, binary, unit = float(m.group(1)), m.group(2).lower(), m.group(3), m.group(4) or "B"
    power = " kmgt".index(prefix) if prefix else 0
    n *= (1024 if binary else 1000) ** power
    return n if unit == "B" else n / 8


@dataclass
class Source:
    """One source registry: what the run takes from it, and what that costs."""

    registry: str
    account: str = "anonymous"
    bases: int = 0
    layers: int = 0                 #: unique layer blobs to copy
    layer_bytes: int = 0
    pulls_spent: int = 0            #: counted requests this plan sent
    pulls_for_run: int = 0          #: counted requests the run still needs
    heads: int = 0
    limit: int | None = None
    window: float | None = None
    remaining: int | None = None


@dataclass
class Plan:
    dataset: str
    to: str
    recipe: str
    total: int
    bad_rows: int
    done: list[str] = field(default_factory=list)
    to_derive: list[str] = field(default_factory=list)
    failing: list[dict[str, str]] = field(default_factory=list)
    sources: dict[str, Source] = field(default_factory=dict)
    payload_bytes: int | None = 0   #: None: not built here yet
    bandwidth: float = 100e6
    groups: list["GroupPlan"] | None = None   #: with ``relayer``: one per re-layering group

    @property
    def bytes_total(self) -> int:
        return sum(s.layer_bytes for s in self.sources.values()) + (self.payload_bytes or 0)

    @property
    def wait_seconds(self) -> float:
        """Windows the run waits for pull budgets beyond what remains now."""
        out = 0.0
        for s in self.sources.values():
            if s.pulls_for_run and s.limit and s.window:
                over = s.pulls_for_run - (s.remaining if s.remaining is not None else s.limit)
                out = max(out, math.ceil(max(0, over) / s.limit) * s.window)
        return out

    @property
    def seconds(self) -> float:
        return self.bytes_total / self.bandwidth + self.wait_seconds

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(bytes_total=self.bytes_total, wait_seconds=self.wait_seconds, seconds=self.seconds,
                   counts={"total": self.total, "done": len(self.done), "to_derive": len(self.to_derive),
                           "failing": len(self.failing), "bad_rows": self.bad_rows})
        return doc


def make_plan(settings: Settings, dataset: str, *, limit: int | None = None, bandwidth: float = 100e6,
              workers: int = 16, client: RegistryClient | None = None,
              log: Callable[[str], None] = lambda m: None, relayer: bool = False) -> Plan:
    from imagefarm.payload import load_payload
    from imagefarm.payload.recipe import recipe_for

    cat = load(dataset).limited(limit)
    recipe = recipe_for(settings)
    to = settings.to.rstrip("/")
    own = client is None
    client = client or RegistryClient(settings, rate_wait=math.inf)  # a plan waits out a window
    plan = Plan(dataset, to, recipe.name, len(cat.bases), len(cat.bad_rows), bandwidth=bandwidth)
    target_registry = settings.prefix.registry

    def one(base: Reference) -> tuple[str, Any]:
        with client.track() as st:
            try:
                return _one(client, base, recipe, to, settings.platform), st
            except ImagefarmError as exc:
                return ("failing", str(exc)), st

    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            results = list(pool.map(one, cat.bases))
        firsts: dict[str, tuple[Reference, oci.Descriptor, str]] = {}
        resolved: dict[str, Any] = {}
        for base, ((kind, what), st) in zip(cat.bases, results):
            src = plan.sources.setdefault(base.registry, Source(base.registry, client.account(base.registry)))
            src.pulls_spent += st.pulls
            if kind == "done":
                plan.done.append(str(base))
            elif kind == "failing":
                plan.failing.append({"base": str(base), "reason": what})
            else:
                plan.to_derive.append(str(base))
                resolved[str(base)] = what
                src.bases += 1
                if client.manifests.get(what.digest, str(base)) is None:  # not kept: the run reads it again
                    src.pulls_for_run += 1
                for d in what.manifest.layers:  # the run copies each blob once per registry
                    firsts.setdefault(d.digest, (base, d, target_repo(base, to)))
        with ThreadPoolExecutor(max(1, workers)) as pool:
            present = list(pool.map(lambda item: base_needs(client, item, target_registry), firsts.values()))
        for (base, d, _), missing in zip(firsts.values(), present):
            if missing:
                src = plan.sources[base.registry]
                src.layers += 1
                src.layer_bytes += d.size
        for st in ratelimit.current().status():
            if st.registry in plan.sources and st.account == plan.sources[st.registry].account:
                s = plan.sources[st.registry]
                s.limit, s.window, s.remaining = st.limit, st.window, st.remaining
        if relayer:
            from .relayerplan import plan_groups

            plan.groups = plan_groups(client, resolved, workers=workers, log=log)
        payload = load_payload(settings, recipe)
        if payload is None:
            plan.payload_bytes = None
        elif plan.to_derive and not client.blob_exists(settings.prefix.repository(PAYLOAD_REPO),
                                                        payload.layer.digest):
            plan.payload_bytes = payload.layer.size
        else:
            plan.payload_bytes = 0
    finally:
        if own:
            client.close()
    return plan


def target_repo(base: Reference, to: Prefix | str) -> str:
    prefix = to if isinstance(to, Prefix) else Prefix.parse(to)
    return prefix.repository(base.repository).path


def base_needs(client: RegistryClient, item: tuple[Reference, oci.Descriptor, str], target_registry: str) -> bool:
    """Is this layer missing from the target repository the run puts it in first?"""
    base, d, repo = item
    if base.registry == target_registry:
        return False  # mounted within the registry: no bytes move
    return not client.blob_exists(Reference(target_registry, repo), d.digest)


def _one(client: RegistryClient, base: Reference, recipe: Any, to: str, platform: str) -> tuple[str, Any]:
    head = client.head_manifest(base)  # not counted by public registries
    if head is None:
        return "failing", f"base {base}: not found in registry {base.registry}"
    if head.media_type in oci.MANIFEST_TYPES and head.digest:
        if _done(client, base, head.digest, recipe, to):
            return "done", None
    pinned = base.with_digest(head.digest) if head.digest else base
    resolved = client.resolve(pinned, platform, head_first=True)  # one counted GET, cached
    check_base(resolved.manifest, f"base {base}")
    if head.media_type not in oci.MANIFEST_TYPES and _done(client, base, resolved.digest, recipe, to):
        return "done", None
    return "derive", resolved


def _done(client: RegistryClient, base: Reference, digest: str, recipe: Any, to: str) -> bool:
    target = derived_reference(base, digest, recipe.name, recipe.digest, recipe.agent_server_version, to)
    return existing_derive(client, target, digest, recipe.digest) is not None


def size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def render(plan: Plan) -> list[str]:
    """The plan as lines a person reads."""
    out = [f"plan: {plan.total} bases from {plan.dataset} -> {plan.to} (recipe {plan.recipe}); nothing written",
           f"  already done {len(plan.done)}, to derive {len(plan.to_derive)}, will fail {len(plan.failing)}, "
           f"bad rows {plan.bad_rows}"]
    for s in plan.sources.values():
        budget = (f"limit {s.limit} per {ratelimit.human(s.window or 0)}, {s.remaining} left now"
                  if s.limit is not None else "no pull limit advertised")
        who = "anonymous (log in for a higher limit)" if s.account == "anonymous" else f"account {s.account}"
        out.append(f"  {s.registry} [{who}; {budget}]: {s.bases} to derive, {s.layers} layers, "
                   f"{size(s.layer_bytes)} to copy; counted requests: {s.pulls_spent} spent by this plan, "
                   f"{s.pulls_for_run} more for the run")
    out.append("  payload: " + ("not built here yet (`imagefarm payload build`)" if plan.payload_bytes is None
                               else f"{size(plan.payload_bytes)} to upload"))
    wait = f" + {ratelimit.human(plan.wait_seconds)} waiting for pull windows" if plan.wait_seconds else ""
    out.append(f"  estimate: {size(plan.bytes_total)} at {size(plan.bandwidth)}/s = "
               f"{ratelimit.human(plan.bytes_total / plan.bandwidth)}{wait}")
    if plan.groups is not None:
        from .relayerplan import render_groups

        out += render_groups(plan.groups)
    for f in plan.failing[:20]:
        out.append(f"  will fail: {f['base']}: {f['reason']}")
    return out
