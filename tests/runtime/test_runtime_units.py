"""Small pure pieces of the runtime server."""

import pytest

from imagefarm.errors import ConfigError, ImagefarmError
from imagefarm.runtime.backend import _duration
from imagefarm.runtime.config import ServeConfig
from imagefarm.runtime.resolver import pinned_image
from imagefarm.runtime.ports import agent_port, parse_command
from imagefarm.serve.lookup import LookupHit
from imagefarm.runtime.state import Record, Store


@pytest.mark.parametrize("command, port", [
    ("/usr/local/bin/openhands-agent-server --port 60000", 60000),
    ("/agent-server/.venv/bin/python -m openhands.agent_server --port 8123", 8123),
    (["/usr/local/bin/openhands-agent-server", "--port=7000"], 7000),
    (["python", "-u", "-m", "openhands.runtime.action_execution_server", "60001", "--working-dir", "/w"], 60001),
    ("/usr/local/bin/openhands-agent-server", 60000),
])
def test_agent_port(command, port):
    assert agent_port(parse_command(command)) == port


def test_parse_command_keeps_quoted_words():
    assert parse_command("sh -c 'echo a b'") == ["sh", "-c", "echo a b"]


def test_pinned_image_from_either_hit_shape():
    d = "sha256:" + "a" * 64
    hit = LookupHit("docker.io/b/x:1", d, "r.io/p/x:t-oh1", d, "default", d, "1", False)
    assert pinned_image(hit) == f"r.io/p/x@{d}"


def test_config_requires_a_key_or_explicit_no_auth():
    with pytest.raises(ImagefarmError, match="API key is required"):
        ServeConfig()
    assert ServeConfig(disable_auth=True).disable_auth
    with pytest.raises(ImagefarmError, match="port range"):
        ServeConfig(api_key="k", port_range=(70000, 70010))


def test_go_durations():
    assert _duration("39.427407ms") == pytest.approx(0.039427407)
    assert _duration("1m2.5s") == pytest.approx(62.5)


def test_store_roundtrip_lock_and_private_files(tmp_path):
    s = Store(tmp_path / "rt")
    s.lock()
    with pytest.raises(ConfigError, match="another runtime server"):
        Store(tmp_path / "rt").lock()
    sid = s.server_id()
    rec = Record("r1", "s1", "c1", "img", "img@sha256:x", None, 30000, 60000, "http://h:30000", "key", None,
                 "running", "ready", 1.0, 2.0)
    s.put(rec)
    assert s.all() == [rec] and s.server_id() == sid
    assert oct((tmp_path / "rt").stat().st_mode & 0o777) == "0o700"
    assert oct((tmp_path / "rt" / "runtimes.sqlite").stat().st_mode & 0o777) == "0o600"
    s.delete("r1")
    assert s.all() == []
    s.close()
