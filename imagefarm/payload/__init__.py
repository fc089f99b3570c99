"""The agent-server payload: one reproducible layer that runs on any x86_64 base.

``build_payload(settings, recipe)`` returns the ``Payload`` for a recipe, building it
only when ``cache_dir/payload/<recipe digest>.json`` (and its blob) is missing:

1. a Debian builder rootfs (``builder.builder_rootfs``, cached; ``userns`` says how a
   normal user builds the same without root);
2. in a chroot of it, the tree at the recipe's prefix (``/agent-server``; ``/openhands/v0``
   for recipe ``v0``): the builder's python3.X and its stdlib, a venv (``home =
   PREFIX/bin``) with the recipe's package (openhands-agent-server; openhands-ai for V0)
   installed by uv, a private tmux (and bash, if asked) under ``tools/bin``, all precompiled
   (unchecked-hash .pyc) -- cached per ``recipe.tree_digest``;
3. the ELF closure (glibc and its loader included) into ``/agent-server/syslib``
   and patchelf (``bundle``), so nothing comes from the base's libc;
4. the launcher (``/usr/local/bin/openhands-agent-server``; V0:
   ``/openhands/micromamba/bin/micromamba``; a Python script whose shebang is the
   venv's python: no /bin/sh needed) and the layer, written by
   ``oci.write_layer`` with fixed mtimes and owners: same recipe, same bytes. In the
   ``zip`` layout (``payload.layout``; both shipped recipes) the pure-Python packages of
   the venv go into one reproducible zip that zipimport reads: a cold pull is dominated by
   the number of files, not by bytes.

Modules: ``cache`` (the ``Payload`` value and its record), ``tree`` (step 2), ``bundle``
(step 3), ``layer`` (step 4; the launcher program is the data file ``launcher.py.tmpl``),
``builder`` (rootfs and chroot), ``disk`` (disk-full errors), ``recipe`` (recipes as data).
"""

from __future__ import annotations

import json
import time

from imagefarm import oci
from imagefarm.errors import PayloadError
from imagefarm.settings import Settings
from .builder import Log, file_lock, quiet
from .cache import Payload, load_payload, payload_dir, record_path
from .disk import disk_errors
from .layer import launcher_script, layer_entries
from .recipe import Recipe
from .tree import build_tree, tree_size

__all__ = ["Payload", "build_payload", "build_tree", "disk_errors", "launcher_script", "load_payload", "payload_dir"]


def build_payload(settings: Settings, recipe: Recipe, *, log: Log = quiet, force: bool = False,
                  mirror: str | None = None) -> Payload:
    """The payload of ``recipe``: from the cache, else built (minutes on a cold cache).

    ``mirror`` overrides the recipe's Debian mirror (default: the machine's apt sources)."""
    if recipe.kind != "append":
        raise PayloadError(f"recipe {recipe.name!r} is kind {recipe.kind!r}: only 'append' recipes have a payload layer")
    if not force and (hit := load_payload(settings, recipe)):
        return hit
    pdir = payload_dir(settings)
    with disk_errors(pdir, "building the payload"), file_lock(pdir / ".lock"):
        if not force and (hit := load_payload(settings, recipe)):
            return hit
        t0 = time.monotonic()
        tree, python_version = build_tree(settings, recipe, log=log, force=force, mirror=mirror)
        log(f"writing the layer (gzip) for recipe {recipe.name} ...")
        layer = oci.write_layer(layer_entries(tree, recipe), pdir / "blobs")
        payload = Payload(recipe.name, recipe.digest, recipe.agent_server_version, layer,
                          tree_size(tree), python_version, round(time.monotonic() - t0, 1))
        rec = record_path(settings, recipe)
        tmp = rec.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload.to_json(), indent=2, sort_keys=True) + "\n")
        tmp.replace(rec)
        log(f"payload {layer.digest[:19]} ({layer.size / 1e6:.0f} MB) in {payload.build_seconds:.0f}s")
        return payload
