"""Host ports for runtimes: which port the agent listens on, and a free one on the node.

A runtime is published on ``<publish address>:<host port>``; the host port comes
from ``--port-range``, skipping ports that live runtimes hold or that something else
on the node has bound (several node processes on one host each get their own range).
"""

from __future__ import annotations

import errno
import shlex
import socket
from typing import Iterable

from .errors import CapacityFull

DEFAULT_AGENT_PORT = 60000


def parse_command(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def agent_port(argv: list[str]) -> int:
    """``--port N`` / ``--port=N``; V0: the positional after ``-m <module>``; else 60000."""
    for i, a in enumerate(argv):
        if a == "--port" and i + 1 < len(argv) and argv[i + 1].isdigit():
            return int(argv[i + 1])
        if a.startswith("--port=") and a[7:].isdigit():
            return int(a[7:])
    if "-m" in argv:
        i = argv.index("-m")
        if i + 2 < len(argv) and argv[i + 2].isdigit():
            return int(argv[i + 2])
    return DEFAULT_AGENT_PORT


class PortPool:
    """Round-robin over the range, so a port just freed is not handed out again at once."""

    def __init__(self, port_range: tuple[int, int], address: str) -> None:
        self.lo, self.hi = port_range
        self.address = address
        self._cursor = self.lo

    def take(self, used: Iterable[int]) -> int:
        lo, hi = self.lo, self.hi
        taken = set(used)
        n = hi - lo + 1
        for i in range(n):
            port = lo + (self._cursor - lo + i) % n
            if port in taken:
                continue
            if bindable(self.address, port):
                self._cursor = lo + (port - lo + 1) % n
                return port
        raise CapacityFull(f"no free port in the range {lo}-{hi} (--port-range): stop runtimes or widen it")


def bindable(address: str, port: int) -> bool:
    host = "0.0.0.0" if address in ("", "::") else address
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True
