"""``prebuild --plan --relayer`` (#27): per repository group, the bytes re-layering
would store and a node would pull per further sibling. What the manifests say is
checked exactly against the registry's manifests (read with httpx); the estimate is
checked against what the re-layering engine then stores for the same group."""

from __future__ import annotations

import json

import httpx

from imagefarm import oci
from imagefarm.derive import Appender, AppendPayload
from imagefarm.derive.relayer import Relayer
from imagefarm.names.reference import parse
from tests.conftest import imagefarm_cli


def _manifests(registry, refs):
    out = []
    for r in refs:
        ref = parse(r)
        out.append(httpx.get(f"{registry.url}/v2/{ref.repository}/manifests/{ref.tag}",
                             headers={"Accept": oci.ACCEPT}).json())
    return out


def _plan(cli_env, tmp_path, refs, to):
    ds = tmp_path / "ds.txt"
    ds.write_text("".join(f"{r}\n" for r in refs))
    proc = imagefarm_cli("prebuild", "--dataset", str(ds), "--to", to, "--plan", "--relayer", "--json",
                         env=cli_env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_plan_relayer_on_buildah_images_counts_from_manifests_and_lists_two(cli_env, registry, project_group,
                                                                            fixtures, tmp_path):
    refs = [i.ref for i in project_group]
    single = fixtures.r2e_base("namanjain12/tornado_final", "6" * 40).ref
    doc = _plan(cli_env, tmp_path, [*refs, single], f"{registry.host}/plan-relayer")
    assert doc["counts"]["to_derive"] == len(refs) + 1
    [g] = doc["groups"]  # the repository of one base takes the plain path: no group
    assert g["repository"] == f"{registry.host}/namanjain12/requests_final" and g["bases"] == len(refs)
    ms = _manifests(registry, refs)
    assert g["lower_layers"] == 1 and g["lower_bytes"] == ms[0]["layers"][0]["size"]
    uppers = {d["digest"]: d["size"] for m in ms for d in m["layers"][1:]}
    assert g["plain_own_bytes"] == sum(uppers.values())
    per = [sum(d["size"] for d in m["layers"][1:]) + m["config"]["size"] for m in ms[1:]]
    assert g["plain_pull_bytes"] == round(sum(per) / len(per))
    # two bases listed (Go-written layers read), the others not
    assert g["how"] == "listing" and g["listed"] == [refs[0], refs[len(refs) // 2]]
    assert 0 < g["own_bytes"] < g["plain_pull_bytes"] and g["relayer_own_bytes"] < g["plain_own_bytes"]
    assert g["plan_read_bytes"] == sum(d["size"] for i in (0, len(refs) // 2) for d in ms[i]["layers"][1:])


def test_plan_relayer_estimate_is_near_what_the_relayer_stores(cli_env, registry, fixtures, settings, tmp_path):
    bases = [h.ref for h in fixtures.r2e_history(n=6, files=120)]
    to = f"{registry.host}/plan-relayer-run"
    [g] = _plan(cli_env, tmp_path, bases, to)["groups"]
    layer = oci.write_layer([oci.file_entry("opt/standin/payload.txt", b"payload\n")], tmp_path / "payload")
    payload = AppendPayload(layer, "plan-test", "sha256:" + "0" * 64, "0", ())
    with Appender(settings) as a:
        group = Relayer(a).relayer(bases, payload, to=to)
    stored = group.common.size + sum(o.size for o in group.own)
    assert group.lower == g["lower_layers"]
    assert stored / 2 <= g["relayer_own_bytes"] <= stored * 2, (g, stored)
    own_mean = sum(o.size for o in group.own) / len(group.own)
    assert own_mean / 3 <= g["own_bytes"] <= own_mean * 3, (g, own_mean)
