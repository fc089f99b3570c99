"""Bad input at every door: each is one clear CLI error line (exit 2, no traceback) or a
4xx from the lookup API, never a 500. Unknown registries are tried without traffic
leaving the machine: DNS failures run in an empty network namespace (``unshare -n``),
refused connections go to a closed loopback port."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from imagefarm import oci
from imagefarm.registry import RegistryClient
from imagefarm.host.services import free_port
from tests.conftest import imagefarm_cli
from tests.registry.regkit import FaultProxy

MALFORMED = {
    "empty": ("", "empty image reference"),
    "spaces": ("namanjain12/pandas final:1", "whitespace"),
    "upper-case repository": ("NamanJain12/Pandas_Final:1", "lower case"),
    "bad digest": ("namanjain12/pandas_final@sha256:1234", "invalid digest"),
    "200-character tag": ("namanjain12/pandas_final:" + "a" * 200, "longer than 128"),
}


def one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, exactly one ``error:`` line that contains every needle."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, (proc.returncode, text[-3000:])
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for n in needles:
        assert n.lower() in errors[0].lower(), (n, errors[0])
    return errors[0]


def cli_offline(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI in a new, empty network namespace: no route anywhere, not even to DNS."""
    exe = str(Path(sys.executable).parent / "imagefarm")
    return subprocess.run(["unshare", "--net", "--", exe, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture
def small_layer(small_payload) -> str:
    return str(small_payload.layer.path)


# -- malformed references ---------------------------------------------------------------------

@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_reference_cli_derive(cli_env, tmp_path, case):
    """Refused before any work: with an empty cache the payload is not even looked for
    (offline, so a regression fails fast instead of building the payload from the network)."""
    ref, why = MALFORMED[case]
    env = {**cli_env, "IMAGEFARM_CACHE_DIR": str(tmp_path / "empty-cache")}
    proc = cli_offline("derive", ref, env=env, timeout=120)
    one_error_line(proc, why)
    assert "building" not in proc.stderr and not (tmp_path / "empty-cache" / "payload").exists()


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_reference_cli_lookup(cli_env, case):
    ref, why = MALFORMED[case]
    one_error_line(imagefarm_cli("lookup", ref, env=cli_env, timeout=120), why)


def test_malformed_reference_api(lookup_api, registry):
    api = lookup_api(f"{registry.host}/rel-bad")
    for case, (ref, why) in MALFORMED.items():
        r = httpx.get(f"{api.url}/v1/lookup", params={"image": ref}, timeout=60)
        assert r.status_code == 400, (case, r.status_code, r.text)
        assert why.lower() in r.json()["detail"].lower(), (case, r.text)
        r = httpx.post(f"{api.url}/v1/invalidate", params={"image": ref}, timeout=60)
        assert r.status_code == 400, (case, r.status_code, r.text)
    # a batch answers malformed entries one by one, beside good ones
    refs = [ref for ref, _ in MALFORMED.values()]
    r = httpx.post(f"{api.url}/v1/lookup", json={"images": refs + ["namanjain12/pandas_final:ok"]}, timeout=60)
    assert r.status_code == 200
    body = r.json()
    assert set(body["invalid"]) == set(refs) and list(body["missing"]) == ["namanjain12/pandas_final:ok"]


# -- unknown registries --------------------------------------------------------------------------

def test_unresolvable_registry_derive(cli_env, registry, small_layer):
    proc = cli_offline("derive", "nosuch.invalid/x:y", "--to", f"{registry.host}/rel-dns",
                       "--payload-layer", small_layer, env=cli_env)
    line = one_error_line(proc, "nosuch.invalid", "cannot reach registry")
    assert "name resolution" in line or "Name or service not known" in line, line


def test_unresolvable_target_lookup(cli_env):
    proc = cli_offline("lookup", "namanjain12/pandas_final:1", "--to", "nosuch.invalid/prebuilt", env=cli_env)
    one_error_line(proc, "nosuch.invalid", "cannot reach registry")


def test_closed_port_derive_and_lookup(cli_env, registry, small_layer, fixtures):
    closed = f"127.0.0.1:{free_port()}"
    one_error_line(imagefarm_cli("derive", f"{closed}/x:y", "--to", f"{registry.host}/rel-closed",
                                 "--payload-layer", small_layer, env=cli_env), closed, "is it running")
    # a good base, a target that is down
    base = fixtures.r2e_base().ref
    one_error_line(imagefarm_cli("derive", base, "--to", f"{closed}/p", "--payload-layer", small_layer,
                                 env=cli_env), closed)
    one_error_line(imagefarm_cli("lookup", base, "--to", f"{closed}/p", env=cli_env), closed)


def test_unknown_registries_api(lookup_api, registry):
    """The lookup never asks the base's registry (training nodes may not reach it): an
    unknown one is just a base with no prebuilt image. A target that is down is a 502
    naming it (the gateway failed), never a 500."""
    api = lookup_api(f"{registry.host}/rel-unknown")
    r = httpx.get(f"{api.url}/v1/lookup", params={"image": "nosuch.invalid/x:y"}, timeout=60)
    assert r.status_code == 404 and r.json()["base"] == "nosuch.invalid/x:y"
    assert r.json()["build"].startswith("imagefarm derive nosuch.invalid/x:y --to ")
    closed = f"127.0.0.1:{free_port()}"
    down = lookup_api(f"{closed}/p")
    r = httpx.get(f"{down.url}/v1/lookup", params={"image": "namanjain12/pandas_final:1"}, timeout=120)
    assert r.status_code == 502 and closed in r.json()["detail"], r.text
    r = httpx.post(f"{down.url}/v1/lookup", json={"images": ["namanjain12/pandas_final:1"]}, timeout=120)
    assert r.status_code == 200 and closed in r.json()["invalid"]["namanjain12/pandas_final:1"]


# -- artifacts that are not images, manifests over 4 MiB --------------------------------------

def push_artifact(settings, ref: str) -> str:
    """An OCI artifact (an SBOM: its own config media type), pushed with the project's client."""
    from imagefarm.names.reference import parse

    r = parse(ref)
    cfg = b"{}"
    sbom = json.dumps({"spdxVersion": "SPDX-2.3", "name": "x"}).encode()
    with RegistryClient(settings) as client:
        client.upload_blob(r, oci.sha256_digest(cfg), cfg)
        client.upload_blob(r, oci.sha256_digest(sbom), sbom)
        doc = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "artifactType": "application/spdx+json",
               "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": oci.sha256_digest(cfg),
                          "size": len(cfg)},
               "layers": [{"mediaType": "application/spdx+json", "digest": oci.sha256_digest(sbom),
                           "size": len(sbom)}]}
        return client.put_manifest(r, oci.canonical_json(doc), oci.OCI_MANIFEST)


def test_artifact_is_not_an_image(cli_env, settings, registry, fixtures, derive_to, small_layer, lookup_api):
    art = f"{registry.host}/namanjain12/sbom_final:1"
    push_artifact(settings, art)
    one_error_line(imagefarm_cli("derive", art, "--to", f"{registry.host}/rel-art", "--payload-layer",
                                 small_layer, env=cli_env), "artifact", "not a container image")
    # an SBOM tagged beside a prebuilt image does not hide it from the lookup
    to = f"{registry.host}/rel-art"
    base = fixtures.r2e_base("namanjain12/scrapy_final", "7" * 40).ref
    result = derive_to(base, to)
    from imagefarm.names.reference import parse

    derived = parse(result.image)
    push_artifact(settings, f"{derived.name}:{derived.tag}-sbom")
    api = lookup_api(to)
    r = httpx.get(f"{api.url}/v1/lookup", params={"image": base}, timeout=60)
    assert r.status_code == 200 and r.json()["digest"] == result.digest, r.text
    # asked about the artifact itself: no prebuilt image (404), not a server error
    r = httpx.get(f"{api.url}/v1/lookup", params={"image": f"{derived.name}:{derived.tag}-sbom"}, timeout=60)
    assert r.status_code == 404, r.text
    hit = imagefarm_cli("lookup", base, "--to", to, "--json", env=cli_env)
    assert hit.returncode == 0 and json.loads(hit.stdout)["digest"] == result.digest, hit.stderr[-2000:]


@pytest.fixture
def big_manifest_proxy(registry, tmp_path):
    """The registry refuses to store a manifest over 4 MiB, so a proxy in front of the
    real registry serves one (the unit's own edge case); all else is forwarded."""
    proxy = FaultProxy(registry.url)
    pad = "x" * (4 * 1024 * 1024 + 10)
    doc = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
           "config": {"mediaType": oci.OCI_CONFIG, "digest": "sha256:" + "0" * 64, "size": 2},
           "layers": [], "annotations": {"pad": pad}}
    body = oci.canonical_json(doc)
    proxy.canned["/v2/namanjain12/huge_final/manifests/1"] = (oci.OCI_MANIFEST, body)
    proxy.canned["/v2/prebuilt/namanjain12/huge_final/manifests/1"] = (oci.OCI_MANIFEST, body)
    yield proxy
    proxy.close()


def test_manifest_over_4mib(cli_env, big_manifest_proxy, registry, small_layer, lookup_api):
    host = big_manifest_proxy.host
    one_error_line(imagefarm_cli("derive", f"{host}/namanjain12/huge_final:1", "--to", f"{registry.host}/rel-big",
                                 "--payload-layer", small_layer, env=cli_env), "over the", "byte limit")
    api = lookup_api(f"{host}/prebuilt")
    r = httpx.get(f"{api.url}/v1/lookup", params={"image": f"{host}/prebuilt/namanjain12/huge_final:1"}, timeout=60)
    assert r.status_code == 404, r.text


# -- datasets -----------------------------------------------------------------------------------------

def _datasets(tmp: Path) -> dict[str, tuple[Path, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {}
    p = tmp / "wrong-columns.parquet"
    pq.write_table(pa.table({"repo": ["a", "b"], "commit": ["1", "2"]}), p)
    out["parquet with wrong columns"] = (p, "no image column")
    p = tmp / "wrong-columns.jsonl"
    p.write_text(json.dumps({"repo": "a"}) + "\n" + json.dumps({"commit": "1"}) + "\n")
    out["jsonl with wrong columns"] = (p, "names no usable image")
    p = tmp / "not-parquet.parquet"
    p.write_text("this is not parquet\n")
    out["not a parquet file"] = (p, "not a readable parquet file")
    p = tmp / "binary.jsonl"
    p.write_bytes(b"\xff\xfe\x00garbage\x80\n")
    out["not text"] = (p, "not UTF-8")
    p = tmp / "wrong-types.jsonl"
    p.write_text('{"docker_image": ["a", "b"]}\n[1, 2]\nnot json\n{"instance": {"instance_id": "Not A Ref"}}\n')
    out["wrong types in every row"] = (p, "names no usable image")
    out["missing file"] = (tmp / "nope.parquet", "neither a file")
    return out


def test_datasets_with_wrong_columns(cli_env, tmp_path, registry):
    """Refused before any payload work: the cache dir stays empty (offline, so a
    regression fails fast instead of building the payload from the network)."""
    env = {**cli_env, "IMAGEFARM_CACHE_DIR": str(tmp_path / "empty-cache")}
    for case, (path, why) in _datasets(tmp_path).items():
        proc = cli_offline("prebuild", "--dataset", str(path), "--to", f"{registry.host}/rel-ds",
                             "--verify", "none", env=env, timeout=120)
        one_error_line(proc, why)
        assert not (tmp_path / "empty-cache" / "payload").exists(), case


def test_bad_rows_are_reported_and_skipped(cli_env, tmp_path, registry, fixtures, small_layer, payload):
    """Good rows beside bad ones: the bad ones are named with their line (from 1), the rest built."""
    good = fixtures.r2e_base("namanjain12/sympy_final", "8" * 40).ref
    art = f"{registry.host}/namanjain12/sbom_final:2"
    from imagefarm.settings import Settings

    push_artifact(Settings.load(), art)
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join([json.dumps({"docker_image": good}), json.dumps({"docker_image": ["a", "b"]}),
                            json.dumps({"repo": "x"}), "not json", json.dumps({"docker_image": art})]) + "\n")
    proc = imagefarm_cli("prebuild", "--dataset", str(p), "--to", f"{registry.host}/rel-mixed", "--verify", "none",
                         "--json", env=cli_env, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]  # one base failed (the artifact)
    assert "Traceback" not in proc.stderr
    state = json.loads(proc.stdout)
    assert state["derived"] == 1 and state["failed"] == 1 and state["bad_rows"] == 3, state
    assert "artifact" in state["failures"][0]["reason"]
    for row in ("line 2", "line 3", "line 4"):
        assert f"mixed.jsonl {row}" in proc.stderr, proc.stderr[-2000:]


# -- API bodies with wrong types -------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    {"images": "namanjain12/pandas_final:1"}, {"images": [1, 2]}, {"images": [None]}, {"images": [["a"]]},
    {}, {"image": ["a"]}, [], "text", 5, None,
])
def test_api_body_wrong_types_422(lookup_api, registry, body):
    api = lookup_api(f"{registry.host}/rel-422", api_key="k")
    r = httpx.post(f"{api.url}/v1/lookup", json=body, headers={"X-API-Key": "k"}, timeout=60)
    assert r.status_code == 422, (body, r.status_code, r.text)
    assert r.json()["detail"]


def test_api_raw_bodies_and_params(lookup_api, registry):
    api = lookup_api(f"{registry.host}/rel-raw")
    h = {"Content-Type": "application/json"}
    for raw in (b"{not json", b"\xff\xfe", b"", b'{"images": [' + b'"a",' * 10 + b"]}"):
        r = httpx.post(f"{api.url}/v1/lookup", content=raw, headers=h, timeout=60)
        assert r.status_code == 422, (raw[:20], r.status_code, r.text)
    too_many = {"images": ["a:1"] * 20_001}
    assert httpx.post(f"{api.url}/v1/lookup", json=too_many, timeout=120).status_code == 422
    assert httpx.get(f"{api.url}/v1/lookup", timeout=60).status_code == 422  # no image
    assert httpx.get(f"{api.url}/v1/lookup", params={"image": "a" * 5000}, timeout=60).status_code == 422
    # rows that are objects of the wrong shape are invalid entries, not a failed request
    rows = [{"instance": 5}, {"instance": {"instance_id": ["x"]}}, {"docker_image": {"a": 1}}, {}]
    r = httpx.post(f"{api.url}/v1/lookup", json={"images": rows}, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["invalid"]) + len(r.json()["missing"]) >= 1


# -- rate limits, plan, mirrors (#17) -----------------------------------------------------------

@pytest.mark.parametrize("args, env_extra, needle", [
    (["--plan", "--bandwidth", "fast"], {}, "--bandwidth"),
    (["--plan", "--bandwidth", "0MB/s"], {}, "--bandwidth"),
    (["--plan"], {"IMAGEFARM_MIRRORS": "docker.io=127.0.0.1:5001"}, "IMAGEFARM_MIRRORS"),
    (["--plan"], {"IMAGEFARM_MIRRORS": '{"docker.io": 5}'}, "IMAGEFARM_MIRRORS"),
])
def test_plan_flags_and_mirrors(cli_env, tmp_path, args, env_extra, needle):
    data = tmp_path / "bases.txt"
    data.write_text(f"127.0.0.1:{free_port()}/namanjain12/x:1\n")
    proc = imagefarm_cli("prebuild", "--dataset", str(data), *args, env={**cli_env, **env_extra}, timeout=120)
    one_error_line(proc, needle)
