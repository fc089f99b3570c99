"""`dev up`'s Redis has a password: a Celery batch runs through it, a client without the
password is answered NOAUTH, and the password is in no log or output."""

from __future__ import annotations

import json
import socket
import stat
import tempfile
from pathlib import Path

from imagefarm.host.services import free_port
from tests.conftest import imagefarm_cli
from tests.farm.conftest import Workers


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        return s.recv(256)


def test_a_celery_batch_runs_through_dev_ups_redis_with_a_password(cli_env, registry, farm_bases, payload,
                                                                    tmp_path):
    state = Path(tempfile.mkdtemp(prefix="imagefarm-devauth-"))
    port = free_port()
    env = {**cli_env, "IMAGEFARM_STATE_DIR": str(state), "IMAGEFARM_BROKER_URL": f"redis://127.0.0.1:{port}/0",
           "IMAGEFARM_TO": f"{registry.host}/devauth"}
    up = imagefarm_cli("dev", "up", env=env)
    workers = Workers(env, tmp_path)
    try:
        assert up.returncode == 0, up.stderr
        pw_file = state / "dev" / "redis.password"
        password = pw_file.read_text().strip()
        assert len(password) >= 32 and stat.S_IMODE(pw_file.stat().st_mode) == 0o600
        assert str(pw_file) in up.stdout
        # without the password: NOAUTH, for PING and for what Celery would do
        assert _raw(port, b"PING\r\n").startswith(b"-NOAUTH"), _raw(port, b"PING\r\n")
        assert _raw(port, b"LPUSH derive x\r\n").startswith(b"-NOAUTH")
        assert _raw(port, f"AUTH default {password}\r\n".encode()).startswith(b"-")  # the default user is off
        conf = state / "dev" / "redis" / "redis.conf"
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        # the worker and the driver find the password in the state dir: nothing passes it
        workers.start("derive", concurrency=1)
        ds = tmp_path / "train.jsonl"
        ds.write_text("".join(json.dumps({"instance": {"instance_id": b}}) + "\n" for b in farm_bases[:2]))
        run = imagefarm_cli("prebuild", "--dataset", str(ds), "--executor", "celery", "--verify", "none",
                            "--json", env=env, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        doc = json.loads(run.stdout)
        assert doc["derived"] + doc["skipped"] == 2 and doc["failed"] == 0, doc
        assert "succeeded" in workers.log(0)  # the worker ran the tasks
        # a second prebuild of the finished batch writes nothing to the registry (the
        # payload, its signature and every image are there): counted from its access log
        mark = registry.mark()
        again = imagefarm_cli("prebuild", "--dataset", str(ds), "--executor", "celery", "--verify", "none",
                              "--json", env=env, timeout=900)
        assert again.returncode == 0 and json.loads(again.stdout)["skipped"] == 2, again.stderr[-3000:]
        writes = [f"{a.method} {a.path}" for a in registry.accesses(mark) if a.method in ("PUT", "POST", "PATCH")]
        assert writes == [], writes
        # never printed or logged
        for text in (up.stdout + up.stderr, run.stdout + run.stderr, again.stdout + again.stderr, workers.log(0),
                     (state / "dev" / "redis" / "redis.log").read_text(errors="replace")):
            assert password not in text
    finally:
        workers.stop_all()
        imagefarm_cli("dev", "down", env=env)


def test_a_broker_url_with_a_password_is_never_printed(cli_env, tmp_path):
    env = {**cli_env, "IMAGEFARM_BROKER_URL": "rediss://farm:s3cr3t-value@127.0.0.1:1/0",
           "IMAGEFARM_STATE_DIR": str(tmp_path / "state")}
    (tmp_path / "state").mkdir(mode=0o700)
    p = imagefarm_cli("doctor", "--json", env=env, timeout=300)
    assert "s3cr3t-value" not in p.stdout + p.stderr


def test_a_result_enters_the_lockfile_only_when_the_registry_holds_it(settings, registry, busybox_base):
    """What a worker says (image, digest) is read back before it is pinned: an image
    outside --to, or a digest the registry lacks there, is left out with the reason."""
    from imagefarm.farm.batchstate import Outcome
    from imagefarm.farm.pinning import result_holds as _result_holds
    from imagefarm.registry import RegistryClient

    bb = busybox_base  # 127.0.0.1:<port>/fixtures/busybox:1
    s = settings.model_copy(update={"to": f"{registry.host}/fixtures"})
    with RegistryClient(s) as c:
        for image in (f"{registry.host}/elsewhere/busybox:1",   # not under --to
                      f"{registry.host}/fixtures/other:1"):     # under --to, digest not there
            o = Outcome("b", ok=True, image=image, digest=bb.digest)
            assert _result_holds(c, s, o, {}) is False and not o.ok and "left out" in o.error
        o = Outcome("b", ok=True, image=bb.ref, digest=bb.digest)
        assert _result_holds(c, s, o, {}) is True and o.ok


def test_a_rediss_broker_url_is_tls_with_certificates_checked():
    import ssl

    from imagefarm.worker.app import make_app

    app = make_app("rediss://farm:pw@127.0.0.1:1/0")
    assert type(app.backend).__name__ == "RedisBackend"  # Celery accepts it (it refuses a bare rediss://)
    assert app.conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED} == app.conf.redis_backend_use_ssl
