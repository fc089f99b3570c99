"""The front's book of nodes: who joined (with which token), what each last reported,
which went quiet.

``NodeBook`` is the only writer of ``Node`` values and of their sqlite row (the
``nodes`` meta key of the front's store); the front asks it who may speak for a node
(``admit``), gives it each report (``note``) and asks which nodes went quiet
(``expire``). What happens to the runtimes of a node is the front's business.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import secrets
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from .errors import NodeForbidden
from .state import Store

log = logging.getLogger("imagefarm.runtime.fleet")


@dataclass
class Node:
    node_id: str
    url: str
    address: str
    slots: int
    boot: str = ""
    ready: bool = False
    state: str = "up"              #: up | lost | left
    last_seen: float = 0.0         #: monotonic
    images: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    warm: dict[str, int] = field(default_factory=dict)        #: warm sandboxes per pinned image
    payloads: list[dict[str, Any]] = field(default_factory=list)
    token_hash: str = ""           #: sha256 of the token the node got when it joined

    def persist(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("last_seen")
        return d


@dataclass(frozen=True)
class Noted:
    """What a report changed: the node, and whether it came back as another process."""

    node: Node
    restarted: bool


class NodeBook:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.nodes: dict[str, Node] = {}
        self._tokens: dict[str, str] = {}  #: tokens handed out by admit() before the node's first report

    def load(self) -> None:
        """The nodes a restarted front knew, each given its node timeout to report again."""
        now = time.monotonic()
        for d in json.loads(self.store.meta("nodes") or "{}").values():
            node = Node(**d, last_seen=now)
            self.nodes[node.node_id] = node

    def save(self) -> None:
        self.store.set_meta("nodes", json.dumps({n.node_id: n.persist() for n in self.nodes.values()}))

    def admit(self, node_id: str, token: str | None, peer: str | None, url: str | None = None) -> str | None:
        """Who may speak for ``node_id``: the node that joined as it, holding the token it
        got then (``NodeForbidden``, 403, otherwise); the URL it reports must be on the
        address it connects from, so the front only ever calls the node itself. A first
        report (join) returns the node's new token."""
        if url is not None:
            host = httpx.URL(url).host
            if peer not in addresses(host):
                raise NodeForbidden(f"node {node_id}: its URL's host {host} is not the address it reports from "
                                    f"({peer}): refused (set --advertise to an address of that node)")
        node = self.nodes.get(node_id)
        if node is not None and node.token_hash:
            if not token or not secrets.compare_digest(_hash(token), node.token_hash):
                raise NodeForbidden(f"node {node_id} joined with its own token; this report does not carry it: "
                                    "refused (a node reports only for its own id)")
            return None
        if url is None:  # a leave for a node that never joined: nothing to do, nothing to give
            return None
        new = secrets.token_urlsafe(32)
        if node is not None:
            node.token_hash = _hash(new)
        else:
            self._tokens[node_id] = _hash(new)
        return new

    def note(self, data: dict[str, Any]) -> Noted:
        """A node's report (join, heartbeat or change), already admitted: the node is up."""
        nid = data["node_id"]
        node = self.nodes.get(nid)
        restarted = node is not None and bool(node.boot) and node.boot != data["boot"]
        if node is None or restarted or node.state != "up":
            log.info("node %s %s at %s (API %s): %d slot(s)%s", nid,
                     "joined" if node is None else ("restarted" if restarted else "is back"),
                     data["address"], data["url"], data["slots"], "" if data.get("ready") else ", prefetching")
        if node is None:
            node = self.nodes[nid] = Node(node_id=nid, url=data["url"], address=data["address"], slots=data["slots"],
                                          token_hash=self._tokens.pop(nid, ""))
        node.url, node.address, node.slots = data["url"], data["address"], int(data["slots"])
        node.boot, node.ready, node.state = data["boot"], bool(data.get("ready")), "up"
        node.last_seen = time.monotonic()
        node.images = list(data.get("images") or [])
        node.stats = dict(data.get("stats") or {})
        node.warm = dict(data.get("warm") or {})
        node.payloads = list(data.get("payloads") or [])
        self.save()
        return Noted(node, restarted)

    def leave(self, node_id: str) -> Node | None:
        node = self.nodes.get(node_id)
        if node is not None:
            node.state = "left"
            log.info("node %s left the fleet", node_id)
            self.save()
        return node

    def expire(self, timeout: float) -> list[tuple[Node, str]]:
        """Nodes silent for longer than ``timeout`` turn lost: each with the reason."""
        now = time.monotonic()
        lost = []
        for node in self.nodes.values():
            if node.state == "up" and now - node.last_seen > timeout:
                node.state = "lost"
                why = (f"node {node.node_id} ({node.address}) stopped answering: no report for "
                       f"{now - node.last_seen:.1f}s (node timeout {timeout:g}s)")
                log.warning("%s", why)
                lost.append((node, why))
        if lost:
            self.save()
        return lost


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def addresses(host: str) -> set[str]:
    """The IP addresses ``host`` names (itself, for an IP)."""
    try:
        return {str(ipaddress.ip_address(host.strip("[]")))}
    except ValueError:
        pass
    try:
        return {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    except OSError:
        return set()
