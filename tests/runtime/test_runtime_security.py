"""The runtime server's security holes, each shown closed against real podman and real requests.

Memory is counted (the server process's RSS from /proc before and after), never timed."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import httpx
import pytest

from imagefarm.farm import attest
from imagefarm.serve.apikey import DOC_PATHS
from imagefarm.host.containers import run
from imagefarm.errors import ImageRefused
from imagefarm.names.reference import parse
from imagefarm.host.samples import R2E_REPOS

from rtkit import (API_KEY, chunked_post, our_containers, raw_post, route_table, rss_bytes, sdk_start_body,
                   wait_pod_status)

pytestmark = pytest.mark.timeout(300)
GiB = 1 << 30


def _sid() -> str:
    return f"sec-{uuid.uuid4()}"


def test_every_route_but_liveness_and_docs_needs_the_key(server_factory, rt_settings):
    """Walk the app's own route table: a route added later is covered without editing this test."""
    with server_factory() as srv:
        app = srv.server.config.app
        assert app.state.open_paths == {"/alive", "/health"} | DOC_PATHS
        checked = set()
        for template, methods in route_table(app.routes):
            path = template.replace("{", "").replace("}", "")  # /sessions/{session_id} -> /sessions/session_id
            for method in methods:
                for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}, {"X-API-Key": API_KEY + "x"}):
                    r = httpx.request(method, srv.url + path, headers=headers, json={"garbage": 1}, timeout=30)
                    if template in app.state.open_paths:
                        assert r.status_code == 200, (method, path, r.status_code)
                    else:
                        assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
                        assert API_KEY not in r.text
                checked.add((method, template))
        assert {("POST", "/start"), ("GET", "/sessions/{session_id}"), ("POST", "/stop"), ("GET", "/list"),
                ("GET", "/image_exists"), ("POST", "/build")} <= checked
        assert len(checked) >= 17, sorted(checked)
        assert srv.manager.records == {} and our_containers(rt_settings, srv.manager.server_id) == []


def test_unauthenticated_gigabyte_is_refused_before_its_body_and_big_bodies_are_413(cli_server, prebuilt):
    srv = cli_server()
    url = srv.start()
    pid = srv.proc.pid
    httpx.get(f"{url}/alive", timeout=30)  # warm: first requests allocate
    before = rss_bytes(pid)
    status, pushed = raw_post(url, "/start", {}, GiB, push=GiB)
    after = rss_bytes(pid)
    assert status == b"HTTP/1.1 401 Unauthorized", status
    assert pushed < 256 << 20, f"the server kept reading: {pushed} bytes accepted after the 401"
    assert after - before < 50 << 20, f"RSS grew {(after - before) >> 20} MiB"
    # with the key: a body over the cap is a 413, also before it is read ...
    status, _ = raw_post(url, "/start", {"X-API-Key": API_KEY}, GiB, push=64 << 20)
    assert status == b"HTTP/1.1 413 Request Entity Too Large", status
    # ... and a chunked one (no Content-Length) is cut at the cap
    status = chunked_post(url, "/stop", {"X-API-Key": API_KEY}, b'{"runtime_id": "' + b"a" * (2 << 20) + b'"}')
    assert status.startswith(b"HTTP/1.1 413"), status
    status = chunked_post(url, "/stop", {"X-API-Key": API_KEY}, b'{"runtime_id": "nope"}')
    assert status.startswith(b"HTTP/1.1 404"), status  # a small chunked body reaches the route
    assert rss_bytes(pid) - before < 50 << 20
    assert srv.proc.poll() is None


@pytest.mark.parametrize("factor", [1e-6, 0, 0.5, 9, 64, "NaN", -1])
def test_resource_factor_outside_the_clients_values_is_422(server_factory, client, prebuilt, factor):
    with server_factory() as srv:
        body = json.dumps(sdk_start_body(prebuilt["busybox_base"], _sid(), resource_factor="__F__"))
        r = client.post(f"{srv.url}/start", content=body.replace('"__F__"', str(factor)),
                        headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        assert "resource_factor must be between 1 and 8" in r.text
        assert srv.manager.records == {}


def test_resource_factor_two_doubles_the_limits(server_factory, client, prebuilt, rt_settings):
    with server_factory(cpus_per_factor=0.5) as srv:
        sid = _sid()
        r = client.post(f"{srv.url}/start", json=sdk_start_body(prebuilt["busybox_base"], sid, resource_factor=2))
        assert r.status_code == 200, r.text
        wait_pod_status(client, f"{srv.url}/sessions/{sid}")
        hc = json.loads(run(rt_settings, ["podman", "inspect", "--format", "{{json .HostConfig}}",
                                          f"imagefarm-rt-{r.json()['runtime_id']}"]).stdout)
        assert hc["Memory"] == 2 * 512 << 20 and hc["NanoCpus"] == 1_000_000_000


def test_environment_names_are_fullmatched_and_values_never_echoed(server_factory, client, prebuilt):
    secret = "s3cr3t-" + uuid.uuid4().hex
    with server_factory() as srv:
        for env in ({"GOOD\n": secret}, {"BAD NAME": secret}, {"X=Y": secret}, {"": secret}):
            r = client.post(f"{srv.url}/start",
                            json=sdk_start_body(prebuilt["busybox_base"], _sid(), environment=env))
            assert r.status_code == 422, (env, r.text)
            assert secret not in r.text and "invalid environment variable names" in r.text
        assert srv.manager.records == {}


def test_failed_runtime_container_is_removed_and_polls_keep_its_logs(server_factory, client, prebuilt, rt_settings):
    """A runtime that never answers (ready timeout) used to keep its container running and
    free its slot; now the container goes, and the slot is held until podman removed it."""
    with server_factory(max_runtimes=1, ready_timeout=3) as srv:
        sid = _sid()
        body = sdk_start_body(prebuilt["busybox_base"], sid, environment={"STANDIN_DELAY": "600"})
        rid = client.post(f"{srv.url}/start", json=body).json()["runtime_id"]
        deadline = time.monotonic() + 60
        while (info := client.get(f"{srv.url}/sessions/{sid}").json())["pod_status"] != "failed":
            assert time.monotonic() < deadline, info
            time.sleep(0.2)
        assert "did not answer" in info["restart_reasons"][0]
        assert f"imagefarm-rt-{rid}" not in our_containers(rt_settings, srv.manager.server_id)  # podman ps -a
        assert our_containers(rt_settings, srv.manager.server_id) == []
        assert srv.manager.records[rid].extra["removed"] is True
        assert srv.manager.live_count() == 0
        # the slot is free again because the container is gone (count from podman, not the status)
        sid2 = _sid()
        r = client.post(f"{srv.url}/start", json=sdk_start_body(prebuilt["busybox_base"], sid2))
        assert r.status_code == 200, r.text
        wait_pod_status(client, f"{srv.url}/sessions/{sid2}")
        assert len(our_containers(rt_settings, srv.manager.server_id)) == 1
        full = client.post(f"{srv.url}/start", json=sdk_start_body(prebuilt["busybox_base"], _sid()))
        assert full.status_code == 429


def test_status_polls_do_not_keep_an_idle_runtime_alive(server_factory, client, prebuilt, rt_settings):
    idle = 4
    with server_factory(idle_timeout=idle) as srv:
        sid = _sid()
        client.post(f"{srv.url}/start", json=sdk_start_body(prebuilt["busybox_base"], sid))
        wait_pod_status(client, f"{srv.url}/sessions/{sid}")
        deadline, answered = time.monotonic() + 60, []
        while (r := client.get(f"{srv.url}/sessions/{sid}")).status_code == 200:  # a trainer polling
            answered.append(time.monotonic())
            assert time.monotonic() < deadline, "polled every 0.1 s, the runtime was never reaped"
            time.sleep(0.1)
        assert r.status_code == 404
        # the polls came more often than the idle timeout: had they counted as use, the
        # runtime would never have been reaped
        gaps = [b - a for a, b in zip(answered, answered[1:])]
        assert len(answered) > 1 and max(gaps) < idle, gaps
        while our_containers(rt_settings, srv.manager.server_id):  # the reaper's podman rm, under way
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_oom_killed_runtime_is_crashloopbackoff(server_factory, client, prebuilt, rt_settings):
    """A small --memory and a command that allocates past it: the kernel kills it."""
    bb = "/usr/local/bin/busybox"
    eat = f"{bb} sh -c 'x=$({bb} head -c 300000000 /dev/zero | {bb} tr \"\\\\0\" a); echo ${{#x}}'"
    with server_factory(memory_mib_per_factor=32) as srv:
        sid = _sid()
        body = sdk_start_body(prebuilt["busybox_base"], sid, command=eat)
        r = client.post(f"{srv.url}/start", json=body)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 120
        while (info := client.get(f"{srv.url}/sessions/{sid}").json())["pod_status"] in ("pending", "running"):
            assert time.monotonic() < deadline, info
            time.sleep(0.2)
        assert info["pod_status"] == "crashloopbackoff", info
        assert info["restart_reasons"][0].startswith("OOMKilled")
        assert our_containers(rt_settings, srv.manager.server_id) == []


def test_user_policy_requested_runs_as_the_requested_user(server_factory, client, prebuilt, rt_settings):
    with server_factory(user_policy="requested") as srv:
        sid = _sid()
        r = client.post(f"{srv.url}/start", json=sdk_start_body(prebuilt["busybox_base"], sid))
        assert r.status_code == 200, r.text
        ready = wait_pod_status(client, f"{srv.url}/sessions/{sid}")
        assert ready["run_as_user"] == "10001:10001"
        name = f"imagefarm-rt-{ready['runtime_id']}"
        out = run(rt_settings, ["podman", "exec", name, "/usr/local/bin/busybox", "sh", "-c",
                                "/usr/local/bin/busybox id -u; /usr/local/bin/busybox id -g; echo $HOME"]).stdout.split()
        assert out == ["10001", "10001", "/tmp"]
        assert "uid 10001" in run(rt_settings, ["podman", "logs", name]).stdout
        assert httpx.get(f"{ready['url']}/alive", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def sec_images(rt_settings, fixtures, standin_layer, rt_to):
    """One base derived twice: with the current recipe, and with a stale one."""
    from imagefarm.derive import Appender, AppendPayload
    from imagefarm.payload.recipe import recipe_for

    recipe = recipe_for(rt_settings)
    base = fixtures.r2e_base(R2E_REPOS[3], "5" * 40)
    current = AppendPayload(standin_layer, recipe.name, recipe.digest, recipe.agent_server_version, ())
    stale = AppendPayload(standin_layer, recipe.name, "sha256:" + "0" * 64, recipe.agent_server_version, ())
    with Appender(rt_settings) as appender:
        return {"base": base.ref, "current": appender.derive(base.ref, current, to=rt_to),
                "stale": appender.derive(base.ref, stale, to=rt_to)}


def forge_record(client, image, digest: str) -> None:
    """What the record looked like before records were signed: a bare artifact at
    ``sha256-<hex>.verified`` whose blob says it booted."""
    from imagefarm import oci
    from imagefarm.names.reference import Reference

    body, empty = b'{"alive":true}', b"{}"
    for blob in (empty, body):
        client.upload_blob(image, oci.sha256_digest(blob), blob)
    desc = client.head_manifest(image.with_digest(digest))
    manifest = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "artifactType": attest.ARTIFACT_TYPE,
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": oci.sha256_digest(empty),
                           "size": 2},
                "layers": [{"mediaType": "application/json", "digest": oci.sha256_digest(body), "size": len(body)}],
                "subject": {"mediaType": desc.media_type, "digest": digest, "size": desc.size}}
    client.put_manifest(Reference(image.registry, image.repository, attest.record_tag(digest)),
                        oci.canonical_json(manifest), oci.OCI_MANIFEST)


def test_one_resolver_refuses_stale_recipes_and_unverified_digests(server_factory, client, sec_images, lookup,
                                                                   rt_settings):
    cur, stale = sec_images["current"], sec_images["stale"]
    by_digest = f"{parse(cur.image).name}@{cur.digest}"
    with server_factory() as srv:
        # the stale recipe's image, by tag or by digest: a clear 409, nothing started
        for ref in (stale.image, f"{parse(stale.image).name}@{stale.digest}"):
            r = client.post(f"{srv.url}/start", json=sdk_start_body(ref, _sid()))
            assert r.status_code == 409, r.text
            assert "not the current recipe" in r.json()["detail"] and "imagefarm derive" in r.json()["detail"]
            with pytest.raises(ImageRefused):
                lookup.resolve(ref)  # the same resolver answers the same (the lookup API's 409)
        # the current recipe's image by digest, never boot-checked: refused
        r = client.post(f"{srv.url}/start", json=sdk_start_body(by_digest, _sid()))
        assert r.status_code == 409 and "boot check" in r.json()["detail"], r.text
        ie = client.get(f"{srv.url}/image_exists", params={"image": by_digest}).json()
        assert ie["exists"] is False and "boot check" in ie["detail"]
        # the base resolves to the current recipe's image, never to the stale one
        r = client.get(f"{srv.url}/image_exists", params={"image": sec_images["base"]}).json()
        assert r["exists"] and r["image"]["prebuilt_image"] == by_digest
        # a forged record (an unsigned artifact at the record tag, as anyone with push
        # rights could put there) is no record: still refused by digest
        forge_record(lookup.client, parse(cur.image), cur.digest)
        r = client.post(f"{srv.url}/start", json=sdk_start_body(by_digest, _sid()))
        assert r.status_code == 409 and "boot check" in r.json()["detail"], r.text
        # once it passed its boot check (the record verify pushes), the digest is served
        attest.record(lookup.client, parse(cur.image), cur.digest, {"alive": True})
        ie = client.get(f"{srv.url}/image_exists", params={"image": by_digest}).json()
        assert ie["exists"] is True and ie["image"]["verified"] is True
        assert srv.manager.records == {} and our_containers(rt_settings, srv.manager.server_id) == []


def test_container_logs_are_capped(rt_settings, prebuilt):
    """40 MB printed: the k8s-file log stays under containers.conf's log_size_max (16 MiB)."""
    image = prebuilt["busybox"].ref
    name = f"imagefarm-logcap-{uuid.uuid4().hex[:8]}"
    bb = "/usr/local/bin/busybox"
    try:
        run(rt_settings, ["podman", "run", "--name", name, "--tls-verify=false", "--entrypoint", bb, image,
                          "sh", "-c", f"{bb} yes 0123456789abcdef | {bb} head -c 40000000"], timeout=300)
        path = run(rt_settings, ["podman", "inspect", "--format", "{{.HostConfig.LogConfig.Path}}", name]).stdout.strip()
        size = os.path.getsize(path)
        assert 0 < size <= 16 << 20, size
    finally:
        run(rt_settings, ["podman", "rm", "-f", "-t", "0", name], check=False)


def test_verify_keeps_the_session_key_off_podmans_command_line(rt_settings, prebuilt):
    """The stand-in answers /alive and /health, then fails the shell check: verify fails, and
    while its container lives its command line (podman's CreateCommand) holds only the name."""
    from imagefarm.errors import VerifyError
    from imagefarm.farm.verify import LABEL, verify

    seen: list[str] = []
    failed: list[BaseException] = []

    def go():
        try:
            verify(rt_settings, f"{parse(prebuilt['busybox'].image).name}@{prebuilt['busybox'].digest}", timeout=60)
        except BaseException as exc:  # noqa: BLE001
            failed.append(exc)

    t = threading.Thread(target=go)
    t.start()
    deadline = time.monotonic() + 120
    while t.is_alive() and not seen:
        assert time.monotonic() < deadline
        out = run(rt_settings, ["podman", "ps", "--all", "--filter", f"label={LABEL}=verify",
                                "--format", "{{.ID}}"], check=False).stdout.split()
        for cid in out:
            got = run(rt_settings, ["podman", "inspect", "--format", "{{json .Config.CreateCommand}}", cid],
                      check=False).stdout.strip()
            if got.startswith("["):
                seen.append(got)
        time.sleep(0.05)
    t.join(180)
    assert seen, "never saw the verify container"
    argv = json.loads(seen[0])
    assert "SESSION_API_KEY" in argv and not any(a.startswith("SESSION_API_KEY=") for a in argv), argv
    assert failed and isinstance(failed[0], VerifyError)


def test_sbatch_and_serve_refuse_a_state_dir_another_user_made(rt_settings, tmp_path):
    """/tmp/imagefarm-runtime-$SLURM_JOB_ID made first by someone else, containers.conf inside."""
    import subprocess
    from pathlib import Path

    import imagefarm.runtime

    planted = tmp_path / "imagefarm-runtime-4343"
    planted.mkdir(mode=0o700)
    (planted / "containers.conf").write_text('[engine]\nruntime = "/tmp/evil"\n')
    os.chown(planted, 65534, 65534)
    exe = str(Path(os.sys.executable).parent / "imagefarm")
    env = dict(os.environ, SLURM_TMPDIR=str(tmp_path), SLURM_JOB_ID="4343", IMAGEFARM=exe,
               IMAGEFARM_RUNTIME_URL_FILE=str(tmp_path / "url"), IMAGEFARM_TO=rt_settings.to)
    env.pop("IMAGEFARM_STATE_DIR", None)
    script = Path(imagefarm.runtime.__file__).with_name("runtime_server.sbatch")
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a directory owned by you" in r.stderr, r.stdout + r.stderr
    assert "runtime server on" not in r.stdout  # refused before anything ran
    # a fresh job id: made 0700 by the script (then the server starts; not needed here)
    env = dict(env, IMAGEFARM_STATE_DIR=str(planted))
    r = subprocess.run([exe, "runtime", "serve", "--port", "0"], env=dict(env, IMAGEFARM_RUNTIME_API_KEY="k"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "belongs to uid 65534" in r.stderr and "Traceback" not in r.stderr
