"""V0 beside the agent server: ``/start`` -> ready on ``imagefarm runtime serve`` for the
``v0`` image (the V0 client's command: ``micromamba run -n openhands python -u -m
openhands.runtime.action_execution_server ...``) and the default agent-server image of
the same base, interleaved so both see the same load; plus each server's own boot
(``podman run`` with the runtime's limits, polled directly). Images on the node (warm).
"""

from __future__ import annotations

from typing import Any

from imagefarm.derive import Appender, AppendPayload
from imagefarm.payload import build_payload
from imagefarm.payload.recipe import recipe_for

from .context import Bench
from .machine import loadavg, summary
from .runtime import Server, direct_start


def both_images(b: Bench) -> dict[str, Any]:
    """The first realistic base derived with the default and the ``v0`` payload (shared
    with the ``starts`` section): base, prefix, settings, v0 recipe and payload, images."""
    reg = b.registry()
    base = b.realistic_set()[0].ref
    prefix = f"{reg.host}/prebuilt"
    b.check_recipe_stable()
    settings = b.settings(to=prefix)
    v0_recipe = recipe_for(settings, "v0")
    v0_built = build_payload(settings, v0_recipe, log=b.log)
    with Appender(settings) as ap:
        images = {"default": ap.derive(base, b.payload, to=prefix),
                  "v0": ap.derive(base, AppendPayload.of(v0_built, v0_recipe), to=prefix)}
    return {"base": base, "prefix": prefix, "settings": settings, "v0_recipe": v0_recipe, "v0_built": v0_built,
            "images": images}


def run_v0(b: Bench) -> dict[str, Any]:
    plan = b.plan
    got = both_images(b)
    base, prefix, v0_recipe, v0_built = got["base"], got["prefix"], got["v0_recipe"], got["v0_built"]
    v0_command = list(v0_recipe.command)
    default_img, v0_img = got["images"]["default"], got["images"]["v0"]
    for img in (default_img, v0_img):  # on the node first: warm starts only
        b.containers(["podman", "pull", "--quiet", "--tls-verify=false", img.ref])
    load0 = loadavg()
    n = plan.warm_starts
    ready: dict[str, list[float]] = {"default": [], "v0": []}
    own: dict[str, list[float]] = {"default": [], "v0": []}
    srv = Server(b, prefix)
    try:
        b.log(f"v0: {n} warm starts of each image through the runtime server, {plan.direct_starts} own boots each")
        for i in range(max(n, plan.direct_starts)):
            if i < n:
                rt = srv.start(base)
                ready["default"].append(rt["ready_s"])
                srv.stop(rt)
                rt = srv.start(base, command=v0_command, probe="/alive", v0=True)
                ready["v0"].append(rt["ready_s"])
                srv.stop(rt)
            if i < plan.direct_starts:
                own["default"].append(direct_start(b, default_img.ref, i)[0])
                own["v0"].append(direct_start(b, v0_img.ref, i, command=v0_command, probes=("/alive",))[0])
    finally:
        srv.close()
    b.log(f"  ready p50: agent server {summary(ready['default'])['p50']:.2f}s, "
          f"v0 {summary(ready['v0'])['p50']:.2f}s")
    return {"base": base, "images": {"default": default_img.ref, "v0": v0_img.ref},
            "payload_bytes": {"default": b.payload.layer.size, "v0": v0_built.layer.size},
            "payload_unpacked_bytes": {"v0": v0_built.uncompressed_size},
            "ready": {k: summary(v) for k, v in ready.items()}, "ready_samples": ready,
            "own_boot": {k: summary(v) for k, v in own.items()}, "own_boot_samples": own,
            "loadavg": [load0, loadavg()]}
