"""The signing primitives on their own: the key pair on disk, DSSE over in-toto, trust."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from imagefarm.errors import SignatureError
from imagefarm.sign import envelope, keys


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "imagefarm"), *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_keys_init_makes_a_private_0600_key_under_the_config_dir_once(tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    env.pop("IMAGEFARM_CONFIG_DIR", None)
    p = _cli("keys", "init", "--json", env=env)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    key = Path(doc["private"])
    assert key == tmp_path / "cfg/imagefarm/keys/farm.key" and doc["made"] is True
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    again = json.loads(_cli("keys", "init", "--json", env=env).stdout)
    assert again["made"] is False and again["keyid"] == doc["keyid"]  # kept, not replaced
    assert doc["trusted"] == [doc["keyid"]]  # the machine's own key is trusted by default


def test_first_use_makes_one_key_even_when_many_ask_at_once(tmp_path):
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: keys.init_keys(tmp_path), range(8)))
    assert sum(m for _, m in made) == 1
    lines: list[str] = []
    s = keys.signer(tmp_path / "other", log=lines.append)
    assert len(lines) == 1 and str(s.path) in lines[0]  # one line saying where


def test_a_bad_trusted_keys_value_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "junk.pub").write_text("not a key\n")
    for value, says in ((str(tmp_path / "missing"), "no such file"), (str(tmp_path / "junk.pub"), "not a PEM"),
                        (str(tmp_path / "empty-dir"), "no *.pub")):
        (tmp_path / "empty-dir").mkdir(exist_ok=True)
        p = _cli("keys", "show", env={**os.environ, "IMAGEFARM_TRUSTED_KEYS": value,
                                      "XDG_CONFIG_HOME": str(tmp_path / "cfg")})
        assert p.returncode == 2 and "IMAGEFARM_TRUSTED_KEYS" in p.stderr and says in p.stderr, p.stderr
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_envelope_opens_only_for_a_trusted_key_the_right_type_and_subject(tmp_path):
    ours, theirs = keys.signer(tmp_path / "a"), keys.signer(tmp_path / "b")
    trust = keys.trust_store(tmp_path / "a", None)
    digest = "sha256:" + "ab" * 32
    stmt = envelope.statement([("img", digest)], "t/v1", {"x": 1})
    env = envelope.seal(ours, stmt)
    assert envelope.open_envelope(env, trust, what="w", predicate_type="t/v1", subject_digest=digest)["predicate"] == {"x": 1}
    with pytest.raises(SignatureError, match="no valid signature by a trusted key"):
        envelope.open_envelope(envelope.seal(theirs, stmt), trust, what="w", predicate_type="t/v1",
                               subject_digest=digest)
    forged = dict(env, payload=base64.b64encode(json.dumps({**stmt, "predicate": {"x": 2}}).encode()).decode())
    with pytest.raises(SignatureError, match="no valid signature"):
        envelope.open_envelope(forged, trust, what="w", predicate_type="t/v1", subject_digest=digest)
    with pytest.raises(SignatureError, match="another subject"):
        envelope.open_envelope(env, trust, what="w", predicate_type="t/v1", subject_digest="sha256:" + "cd" * 32)
    with pytest.raises(SignatureError, match="not 'u/v1'"):
        envelope.open_envelope(env, trust, what="w", predicate_type="u/v1", subject_digest=digest)
    # theirs is trusted once its public half is named
    trusting = keys.trust_store(tmp_path / "a", str(tmp_path / "b/keys/farm.pub"))
    envelope.open_envelope(envelope.seal(theirs, stmt), trusting, what="w", predicate_type="t/v1",
                           subject_digest=digest)
