"""Which prebuilt image serves a requested image: the resolver the server is given.

The server never builds: every ``/start`` asks a ``Resolver`` for a prebuilt,
digest-pinned agent-server image. There is one resolver for the lookup API, the CLI
and this server, ``imagefarm.serve.lookup.Lookup`` (lockfile and registry backed): it
prefers verified images of the current recipe and refuses (``ImageRefused``, 409) a
derived reference of another recipe, or one by digest that never passed its boot
check. It is synchronous; the server calls it in a worker thread.

Shape (what the server reads from a hit): ``pinned`` or ``image`` (``repo@sha256:...``),
``base``, ``digest``, ``verified``, ``agent_server_version`` and, optionally, ``size``.
"""

from __future__ import annotations

from typing import Any, Protocol

from imagefarm.names.reference import parse


#: the ``/start`` environment variable a client sets to ask for images of one
#: openhands-agent-server version (else the server's ``--agent-server-version``, else
#: the newest verified version of the base)
VERSION_ENV = "IMAGEFARM_AGENT_SERVER_VERSION"


class Resolver(Protocol):
    def resolve(self, image: str, *, recipe: str | None = None, version: str | None = None) -> Any:
        """The prebuilt image serving ``image`` (a base or a derived reference) of
        ``recipe`` at ``version`` (None: the resolver's defaults), or None."""


def describe_base(image: str) -> str:
    """The base a request names, normalised for messages (the input if unparsable)."""
    try:
        ref = parse(image)
    except Exception:  # noqa: BLE001
        return image
    return ref.familiar
