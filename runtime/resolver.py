"""Which prebuilt image serves a requested image: the resolver the server is given.

The server never builds: every ``/start`` asks a ``Resolver`` for a prebuilt,
digest-pinned agent-server image. There is one resolver for the lookup API, the CLI
and this server, ``imagefarm.serve.lookup.Lookup`` (lockfile and registry backed): it
prefers verified images of the current recipe and refuses (``ImageRefused``, 409) a
derived reference of another recipe, or one by digest that never passed its boot
check. It is synchronous; the server calls it in a worker thread.

The recipe comes from the client's command: a command that runs another recipe's
launcher (V0's ``/openhands/micromamba/bin/micromamba run -n openhands python -m
openhands.runtime.action_execution_server ...`` runs recipe ``v0``'s) asks for that
recipe's image; any other command (the agent server's) for the settings' recipe.

Shape (what the server reads from a hit): ``pinned`` or ``image`` (``repo@sha256:...``),
``base``, ``digest``, ``verified``, ``agent_server_version`` and, optionally, ``size``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from pathlib import Path
from typing import Any, Protocol, Sequence

from imagefarm.errors import ConfigError, ImagefarmError
from imagefarm.names.reference import Reference, parse
from imagefarm.payload.recipe import load_recipe

from .errors import NoPrebuiltImage

log = logging.getLogger("imagefarm.runtime")


#: the ``/start`` environment variable a client sets to ask for images of one
#: openhands-agent-server version (else the server's ``--agent-server-version``, else
#: the newest verified version of the base)
VERSION_ENV = "IMAGEFARM_AGENT_SERVER_VERSION"


class Resolver(Protocol):
    def resolve(self, image: Reference, *, recipe: str | None = None, version: str | None = None) -> Any:
        """The prebuilt image serving ``image`` (a base or a derived reference, parsed
        once by the server) of ``recipe`` at ``version`` (None: the resolver's
        defaults), or None."""


#: what the agent server answers once it serves
DEFAULT_READY = ("/alive", "/health")


@functools.lru_cache(maxsize=8)
def _launchers(recipes_dir: Path, default: str) -> dict[str, str]:
    """launcher path -> recipe name, for the append recipes whose launcher is not the
    ``default`` recipe's (a variant of the agent server, like a test's broken recipe,
    is asked for by name, never by command)."""
    try:
        own = load_recipe(default, recipes_dir).payload.launcher
    except ConfigError:
        own = None
    out: dict[str, str] = {}
    for path in sorted(Path(recipes_dir).glob("*.toml")):
        try:
            recipe = load_recipe(str(path), recipes_dir)
        except ConfigError:
            continue
        if recipe.kind == "append" and recipe.payload.launcher != own:
            out.setdefault(recipe.payload.launcher, recipe.name)
    return out


@functools.lru_cache(maxsize=32)
def ready_paths(recipes_dir: Path, recipe: str | None) -> tuple[str, ...]:
    """The paths a runtime of ``recipe`` (None: the agent server) answers once ready."""
    if recipe is None:
        return DEFAULT_READY
    try:
        return load_recipe(recipe, recipes_dir).ready
    except ConfigError:
        return DEFAULT_READY


def recipe_for_command(settings: Any, argv: Sequence[str]) -> str | None:
    """The recipe whose launcher ``argv`` runs, or None for the settings' recipe."""
    if not argv:
        return None
    return _launchers(Path(settings.recipes_dir), settings.recipe).get(argv[0])


def pinned_image(hit: Any) -> str:
    """``repo@sha256:...`` from a resolver hit (``.pinned`` if it has one, else ``.image``)."""
    image = getattr(hit, "pinned", None) or hit.image
    if "@" in image:
        return image
    return parse(image).with_digest(hit.digest).pinned


class Resolving:
    """Resolution and image sizes for a server (a node's manager, a fleet's front): the
    resolver called off the event loop, sizes asked of the registry once per image."""

    def __init__(self, settings: Any, resolver: Resolver) -> None:
        self.settings, self.resolver = settings, resolver
        self.to = str(settings.prefix)
        self._sizes: dict[str, int] = {}
        self._registry: Any = None

    async def resolve(self, image: str, recipe: str | None = None, *, version: str | None = None) -> Any:
        """The resolver's hit for ``image`` of ``recipe`` (None: the settings'; the caller
        takes it from the client's command with ``recipe_for_command``) at agent-server
        ``version`` (None: the resolver's default); ``NoPrebuiltImage`` without one."""
        ref = parse(image)  # the one parse of a request's image: InvalidReference (400) before any registry traffic
        ask = {k: v for k, v in (("recipe", recipe), ("version", version)) if v}
        hit = await asyncio.to_thread(functools.partial(self.resolver.resolve, ref, **ask))
        if hit is None:
            raise NoPrebuiltImage(image, ref.familiar, self.to, recipe=recipe, version=version)
        return hit

    def registry(self) -> Any:
        from imagefarm.registry import RegistryClient

        if self._registry is None:
            self._registry = RegistryClient(self.settings)
        return self._registry

    async def image_size(self, hit: Any) -> int:
        """Bytes of the prebuilt image (config + layers, compressed), from the hit or the registry."""
        size = getattr(hit, "size", None)
        if size:
            return int(size)
        pinned = pinned_image(hit)
        if pinned not in self._sizes:
            def fetch() -> int:
                m = self.registry().resolve(parse(pinned)).manifest
                return m.config.size + sum(layer.size for layer in m.layers)
            try:
                self._sizes[pinned] = await asyncio.to_thread(fetch)
            except (ImagefarmError, OSError) as exc:
                log.info("size of %s unknown: %s", pinned, exc)
                return 0
        return self._sizes[pinned]

    def close(self) -> None:
        if self._registry is not None:
            self._registry.close()
            self._registry = None
