"""The harness itself: real registry, auth registry, Redis and podman all work."""

import json
import socket
import time

import httpx

from imagefarm.host.containers import run


def test_registry_roundtrip_with_skopeo(settings, registry, r2e_base):
    raw = run(settings, ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{r2e_base.ref}"]).stdout
    manifest = json.loads(raw)
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert len(manifest["layers"]) == 3
    config = json.loads(run(settings, ["skopeo", "inspect", "--config", "--tls-verify=false",
                                       f"docker://{r2e_base.ref}"]).stdout)
    assert "VIRTUAL_ENV=/testbed/.venv" in config["config"]["Env"]
    assert any(e.startswith("PATH=/testbed/.venv/bin:") for e in config["config"]["Env"])
    tags = httpx.get(f"{registry.url}/v2/namanjain12/pandas_final/tags/list").json()
    assert r2e_base.ref.rsplit(":", 1)[1] in tags["tags"]


def test_auth_registry_requires_basic_auth(auth_registry):
    assert httpx.get(f"{auth_registry.url}/v2/").status_code == 401
    assert httpx.get(f"{auth_registry.url}/v2/", auth=("farm", "wrong")).status_code == 401
    assert httpx.get(f"{auth_registry.url}/v2/", auth=("farm", "s3cret")).status_code == 200


def test_redis_answers(redis_server):
    import redis

    r = redis.Redis.from_url(redis_server.url)
    r.set("imagefarm:probe", "1")
    assert r.get("imagefarm:probe") == b"1"


def test_podman_runs_r2e_base(settings, r2e_base):
    out = run(settings, ["podman", "run", "--rm", "--tls-verify=false", r2e_base.ref, "bash", "-c",
                         "cat /testbed/run_tests.sh && echo VENV=$VIRTUAL_ENV && command -v python && "
                         "git -C /testbed log --oneline | wc -l && /testbed/run_tests.sh"]).stdout
    assert "#!/bin/bash" in out
    assert "VENV=/testbed/.venv" in out
    assert "/testbed/.venv/bin/python" in out
    assert "in /testbed/.venv" in out  # run_tests.sh printed the venv prefix


def test_busybox_base_has_no_python_or_libc(settings, busybox_base):
    out = run(settings, ["podman", "run", "--rm", "--tls-verify=false", busybox_base.ref, "sh", "-c",
                         "command -v python3 || echo no-python; ls /lib* 2>/dev/null || echo no-libc"]).stdout
    assert "no-python" in out and "no-libc" in out


def test_multiarch_index_resolves_to_amd64(settings, multiarch_base):
    index = json.loads(run(settings, ["skopeo", "inspect", "--raw", "--tls-verify=false",
                                      f"docker://{multiarch_base.ref}"]).stdout)
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    archs = {m["platform"]["architecture"] for m in index["manifests"]}
    assert archs == {"amd64", "arm64"}
    out = run(settings, ["podman", "run", "--rm", "--tls-verify=false", multiarch_base.ref, "uname", "-m"]).stdout
    assert out.strip() == "x86_64"


def test_free_ports_are_loopback(registry, redis_server):
    for port in (registry.port, redis_server.port):
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass


def test_conmon_exit_cleanup_marks_containers_exited(settings, busybox_base):
    """conmon's exit command (`podman container cleanup`, run with --root) must find the
    container in the same database: otherwise it stays "stopped" for ever, its mounts
    are never released and every attached run or wait sits out a 20 s timeout."""
    cid = run(settings, ["podman", "run", "-d", "--tls-verify=false", busybox_base.ref, "true"]).stdout.strip()
    try:
        status = ""
        for _ in range(300):  # bounded poll: cleanup runs within a second when it works
            status = run(settings, ["podman", "inspect", "--format", "{{.State.Status}}", cid]).stdout.strip()
            if status == "exited":
                break
            time.sleep(0.1)
        assert status == "exited", f"container {cid[:12]} still {status!r}: conmon's cleanup did not run"
    finally:
        run(settings, ["podman", "rm", "-f", cid], check=False)
