"""The buildah path: a recipe with a RUN step on a tiny busybox base."""

from __future__ import annotations

from dataclasses import dataclass

from imagefarm import oci
from imagefarm.host.containers import run
from imagefarm.derive.build import build, render
from imagefarm.names.reference import parse
from imagefarm.names.tags import derived_reference
from derivekit import file_layer, push_base, skopeo_json


@dataclass(frozen=True)
class HelloRecipe:
    name: str = "hello"
    digest: str = "sha256:" + "7" * 64
    agent_server_version: str = "1.58.2"
    env: tuple[str, ...] = ("GREETING=hi there",)
    containerfile: str = "FROM {base}\nRUN echo hi > /hello && echo ${GREETING:-unset} > /greeting\n"


def test_render_keeps_shell_braces():
    ref = parse("127.0.0.1:5000/a/b@sha256:" + "1" * 64)
    text = render("RUN echo ${HOME}\n", ref, ("K=V",))
    assert text == f"FROM {ref}\nRUN echo ${{HOME}}\nENV K=\"V\"\n"


def test_buildah_recipe_runs_on_base(dsettings, dreg, dwork, bb_layer):
    base = f"{dreg.host}/namanjain12/pandas_final:{'b' * 40}"
    push_base(dwork / "build", base, [bb_layer, file_layer(dwork / "blobs", "x", "base file\n")], user=None)
    r = build(base, HelloRecipe(), dsettings)
    assert r.kind == "buildah" and not r.skipped
    # the deterministic tag: a pure function of the base digest and the recipe
    want = derived_reference(base, r.base_digest, HelloRecipe.name, HelloRecipe.digest, "1.58.2", dsettings.to)
    assert r.image == str(want) and "-oh1.58.2-hello-" in r.image
    raw = skopeo_json(r.image, "--raw")
    assert len(raw["layers"]) == 3
    assert raw["annotations"][oci.ANN_BASE_DIGEST] == r.base_digest
    assert raw["annotations"][oci.ANN_RECIPE_DIGEST] == HelloRecipe.digest
    out = run(dsettings, ["podman", "run", "--rm", "--tls-verify=false", r.ref,
                          "cat", "/hello", "/testbed/x"], timeout=300).stdout
    assert out == "hi\nbase file\n"
    again = build(base, HelloRecipe(), dsettings)
    assert again.skipped and again.digest == r.digest
