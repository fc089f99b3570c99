"""What the fault tests count, instead of inferring: the registry's own access log (one
line per answered request) and the broker-side delivery records the tasks keep in Redis
(``imagefarm:task:<id>``, see worker/tasks.py).

Each fault test ends with ``Evidence.check(...)`` -- exactly one tag PUT per base,
verified images verified once and tagged only after podman pulled them for the boot
check, redelivery by the broker and none by the driver -- and prints its row of the
fault table in docs/RELIABILITY.md (run pytest with ``-s`` to see it).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis

from imagefarm.farm.lockfile import Lockfile
from imagefarm.derive.append import PAYLOAD_REPO
from imagefarm.names.reference import Prefix, parse
from imagefarm.host.services import Access, Registry

_MANIFEST = re.compile(r"^/v2/(.+)/manifests/([^/?]+)$")
_UPLOAD_DONE = re.compile(r"^/v2/(.+)/blobs/uploads/([^/?]+)\?.*digest=(sha256(?::|%3A)[0-9a-f]{64})")


def task_records(url: str) -> dict[str, dict[str, str]]:
    """Every task's delivery record in the broker at ``url``: id -> fields."""
    client = redis.Redis.from_url(url, decode_responses=True)
    out = {}
    for key in client.scan_iter("imagefarm:task:*", count=1000):
        out[key.rsplit(":", 1)[1]] = client.hgetall(key)
    return out


def open_uploads(reg: Registry, *, skip: str = "") -> set[str]:
    """Upload sessions the registry holds open with bytes already received (their ids);
    ``skip``: not those into repositories whose path ends so."""
    repos = reg.workdir / "data" / "docker" / "registry" / "v2" / "repositories"
    out = set()
    for data in repos.glob("**/_uploads/*/data"):
        if skip and data.parent.parent.parent.name == skip:
            continue
        try:
            if data.stat().st_size > 0:
                out.add(data.parent.name)
        except OSError:  # finished (and removed) while we looked
            pass
    return out


def is_podman(a: Access) -> bool:
    return "containers/" in a.agent or "podman" in a.agent.lower()


@dataclass
class Evidence:
    """Counts read from the access log of ``reg`` for the images under ``to``."""

    accesses: list[Access]
    to_repo: str                                                 #: repository prefix of ``to``
    tag_puts: Counter = field(default_factory=Counter)           #: (repo, tag) -> 201 PUTs of the tag
    payload_puts: Counter = field(default_factory=Counter)       #: the payload's own tag (``payload push``)
    record_puts: Counter = field(default_factory=Counter)        #: (repo, digest) -> verification records
    prov_puts: Counter = field(default_factory=Counter)          #: (repo, digest) -> signed provenance
    uploads: Counter = field(default_factory=Counter)            #: (repo, digest) -> completed uploads
    finished_uploads: set[str] = field(default_factory=set)      #: upload session ids completed
    started_uploads: int = 0                                     #: upload sessions opened (POST 202)

    @classmethod
    def read(cls, reg: Registry, to: str, mark: int = 0) -> "Evidence":
        """From the access log (from byte ``mark`` on: ``reg.mark()`` taken earlier)."""
        ev = cls(reg.accesses(mark), Prefix.parse(to).path)
        payload_repo = Prefix.parse(to).repository(PAYLOAD_REPO).path
        for a in ev.accesses:
            if a.method == "POST" and a.status == 202 and a.path.startswith(f"/v2/{ev.to_repo}/"):
                ev.started_uploads += 1
            if a.method == "PUT" and a.status == 201:
                m = _MANIFEST.match(a.path)
                if m and m.group(1).startswith(ev.to_repo + "/"):
                    repo, ref = m.groups()
                    if repo == payload_repo:  # published before the batch: not a base's image
                        ev.payload_puts[(repo, ref)] += 1
                    elif ref.endswith(".verified"):
                        ev.record_puts[(repo, ref[:-len(".verified")].replace("-", ":", 1))] += 1
                    elif ref.endswith(".prov"):  # the image's signed provenance, beside it
                        ev.prov_puts[(repo, ref[:-len(".prov")].replace("-", ":", 1))] += 1
                    elif not ref.startswith("sha256:"):
                        ev.tag_puts[(repo, ref)] += 1
                    continue
                u = _UPLOAD_DONE.match(a.path)
                if u:
                    ev.uploads[(u.group(1), u.group(3).replace("%3A", ":"))] += 1
                    ev.finished_uploads.add(u.group(2))
        return ev

    @property
    def repeated_uploads(self) -> int:
        return sum(n - 1 for n in self.uploads.values())

    @property
    def abandoned_uploads(self) -> int:
        """Upload sessions opened and never completed (cut by a fault, started again)."""
        return self.started_uploads - len(self.finished_uploads)

    def check(self, lockfile: Path, bases: list[str], verified: set[str] = frozenset()) -> Lockfile:
        """Every base has exactly one tagged image (one tag PUT, never two); each verified
        one has exactly one verification record, and its tag was put only after podman
        pulled that digest for the boot check."""
        lock = Lockfile.read(lockfile)
        assert sorted(e.base for e in lock.entries) == sorted(bases), "lost or extra bases in the lockfile"
        mine = {(parse(e.image).repository, parse(e.image).tag) for e in lock.entries}
        assert set(self.tag_puts) == mine, sorted(set(self.tag_puts) ^ mine)[:10]
        doubled = {k: n for k, n in self.tag_puts.items() if n != 1}
        assert not doubled, f"tags put more than once: {doubled}"
        for e in lock.entries:
            ref = parse(e.image)
            if e.base not in verified:
                assert (ref.repository, e.image_digest) not in self.record_puts
                continue
            assert e.verified, e
            assert self.record_puts[(ref.repository, e.image_digest)] == 1, (e.image, self.record_puts)
            pulled = [i for i, a in enumerate(self.accesses) if is_podman(a) and a.method == "GET"
                      and a.path == f"/v2/{ref.repository}/manifests/{e.image_digest}" and a.status == 200]
            tagged = [i for i, a in enumerate(self.accesses) if a.method == "PUT" and a.status == 201
                      and a.path == f"/v2/{ref.repository}/manifests/{ref.tag}"]
            assert pulled and tagged and pulled[0] < tagged[0], (
                f"{e.image}: tagged before its boot check pulled it (pull at {pulled[:1]}, tag at {tagged[:1]})")
        return lock


def deliveries(records: dict[str, dict[str, str]]) -> dict[str, int]:
    """Broker-side counts: tasks, deliveries beyond the first and beyond the task's own
    retries (``extra``), deliveries the broker marked as restored (``redelivered``)."""
    extra = sum(max(0, int(r.get("deliveries", 0)) - 1 - int(r.get("retries", 0)) - int(r.get("paused", 0)))
                for r in records.values())
    return {"tasks": len(records), "extra": extra,
            "redelivered": sum(int(r.get("redelivered", 0)) for r in records.values()),
            "retries": sum(int(r.get("retries", 0)) for r in records.values())}


def row(fault: str, bases: int, lost: int, ev: Evidence, counts: dict[str, int], state: dict, cleared: float,
        command: str) -> str:
    """One line of the fault table in docs/RELIABILITY.md, printed by the test. ``cleared``:
    when the fault was over (epoch); the last tag PUT is read from the access log, the
    batch's end from its state."""
    last_tag = max(a.when for a in ev.accesses if a.method == "PUT" and a.status == 201
                   and "/manifests/" in a.path and "/manifests/sha256" not in a.path and ".verified" not in a.path)
    dup = (f"tag PUTs beyond one: {sum(n - 1 for n in ev.tag_puts.values())}; blob uploads repeated: "
           f"{ev.repeated_uploads}, cut and redone: {ev.abandoned_uploads}; deliveries beyond one (broker): "
           f"{counts.get('extra', '-')}, task retries: {counts.get('retries', '-')}; driver resubmits: "
           f"{state.get('resubmitted', 0)}")
    line = (f"| {fault} | {bases} | {lost} | {dup} | last tag {max(0.0, last_tag - cleared):.0f} s, batch done "
            f"{state['finished'] - cleared:.0f} s | {counts.get('tasks', '-')} task records, "
            f"{counts.get('redelivered', '-')} restored by the broker; {len(ev.accesses)} registry requests | "
            f"`{command}` |")
    print("\nFAULT-ROW " + line, flush=True)
    return line
