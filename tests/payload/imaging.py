"""Test helper: an agent-server image = fixture base layers + the payload layer.

Written here (not with the derive helper) so the payload is proven on its own:
the image is assembled as an OCI layout and pushed with skopeo, like any derive.
"""

from __future__ import annotations

from imagefarm import oci
from imagefarm.payload import Payload
from imagefarm.payload.recipe import Recipe
from imagefarm.host.samples import BUSYBOX_ENV, R2E_ENV, FixtureFactory


def _merge_env(base: list[str], extra: tuple[str, ...]) -> list[str]:
    keys = {e.split("=", 1)[0] for e in extra}
    return [e for e in base if e.split("=", 1)[0] not in keys] + list(extra)


def agent_image(fixtures: FixtureFactory, kind: str, payload: Payload, recipe: Recipe,
                repo: str | None = None) -> str:
    """Push ``kind`` ("r2e" or "busybox") + payload as ``<registry>/<repo>:<payload digest>``."""
    if kind == "r2e":
        base = fixtures.r2e_base()
        layers = [fixtures.os_layer(), fixtures.venv_layer(),
                  fixtures.testbed_layer(base.ref.split("/", 1)[1].rsplit(":", 1)[0], base.ref.rsplit(":", 1)[1])]
        env, workdir = R2E_ENV, "/testbed"
    elif kind == "busybox":
        layers = [fixtures.busybox_layer()]
        env, workdir = BUSYBOX_ENV, None
    else:
        raise ValueError(kind)
    layers.append(payload.layer)
    config = oci.image_config(layers, env=_merge_env(env, recipe.env), cmd=list(recipe.command),
                              working_dir=workdir)
    tag = f"{kind}-{recipe.name}-{payload.digest[7:19]}"
    fixtures.layout.add_image(layers, config, tag)
    ref = f"{fixtures.host}/{repo or 'payload-test/' + kind}:{recipe.name}-{payload.digest[7:19]}"
    fixtures.push(tag, ref)
    return ref
