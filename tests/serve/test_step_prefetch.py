"""The trainer's side of foresight: the next step's instances -> pinned images -> the
runtime's ``POST /prefetch`` with ``warm``, and ``launch sbatch --prefetch-first N --warm K``.

The helper is exercised against a real runtime server in tests/runtime/test_step_prefetch.py;
here its own edge cases: row shapes, the lockfile, one image per instance, the read-ahead
loader's state, bad values."""

from __future__ import annotations

import json

import httpx
import pytest

from imagefarm.errors import ConfigError
from imagefarm.farm.lockfile import Lockfile
from imagefarm.serve.launch import Lookahead, StepPrefetch
from tests.cli.test_config_errors import one_error_line
from tests.conftest import imagefarm_cli
from tests.serve.test_launch import HEX, entry, skyrl_dataset  # noqa: F401 - a fixture

LOCK = Lockfile((entry(0), entry(1)))


def _recording():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.headers.get("x-api-key"), json.loads(request.content)))
        return httpx.Response(200, json={"images": [{"image": i, "warm": 0} for i in json.loads(request.content)["images"]]})

    return seen, httpx.MockTransport(handler)


def test_rows_ids_and_images_become_base_images_once_each():
    seen, transport = _recording()
    with StepPrefetch("http://127.0.0.1:9", "k", lockfile=LOCK, warm=8, agent_server_version="1.58.2",
                      transport=transport) as p:
        skyrl_prompt = {"prompt": [], "env_class": "r2e", "uid": "u",
                        "env_extras": {"instance": {"instance_id": entry(0).instance_id}}}
        rows = p.next_step([skyrl_prompt, skyrl_prompt, entry(1).instance_id, entry(1).base,
                            "127.0.0.1:5000/r2e/other:1"]).result(timeout=30)
    assert [r["image"] for r in rows] == [entry(0).base, entry(1).base, "127.0.0.1:5000/r2e/other:1"]
    assert seen == [("k", {"images": [entry(0).base, entry(1).base, "127.0.0.1:5000/r2e/other:1"],
                           "recipe": None, "agent_server_version": "1.58.2", "warm": 8})]


@pytest.mark.parametrize("bad", ["namanjain12/unknown:1", "not a reference"])
def test_unknown_short_names_are_refused_never_guessed(bad):
    with StepPrefetch("http://127.0.0.1:9", lockfile=LOCK) as p, pytest.raises(ConfigError, match="prefetch"):
        p.images([bad])


@pytest.mark.parametrize("warm", [-1, 65, "8"])
def test_bad_warm_is_a_config_error(warm):
    with pytest.raises(ConfigError, match="warm"):
        StepPrefetch("http://127.0.0.1:9", warm=warm)


def test_from_env_reads_the_training_jobs_environment(tmp_path):
    env = {"SANDBOX_REMOTE_RUNTIME_API_URL": "http://127.0.0.1:9", "ALLHANDS_API_KEY": "k",
           "IMAGEFARM_PREFETCH_WARM": "4"}
    with StepPrefetch.from_env(environ=env) as p:
        assert p.warm == 4 and p.lock is None
    with pytest.raises(ConfigError, match="IMAGEFARM_PREFETCH_WARM"):
        StepPrefetch.from_env(environ={**env, "IMAGEFARM_PREFETCH_WARM": "many"})


class _Loader:
    """The part of torchdata's StatefulDataLoader a trainer uses: len, iter, state_dict."""

    def __init__(self, n):
        self.n, self.read = n, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        for i in range(self.n):
            self.read = i + 1
            yield [f"i{i}a", f"i{i}b"]

    def state_dict(self):
        return {"read": self.read}


class _Told:
    def __init__(self):
        self.steps = []

    def next_step(self, batch):
        self.steps.append(batch)


def test_lookahead_tells_step_k_plus_1_while_k_runs_and_keeps_the_state_of_k():
    told, loader = _Told(), _Loader(3)
    wrapped = Lookahead(loader, told)
    assert len(wrapped) == 3
    states = []
    for k, batch in enumerate(wrapped):
        assert batch == [f"i{k}a", f"i{k}b"]
        # while step k runs the server already knows step k+1 (none after the last)
        assert told.steps[-1] == ([f"i{k + 1}a", f"i{k + 1}b"] if k < 2 else ["i2a", "i2b"])
        states.append(wrapped.state_dict()["read"])
    assert states == [1, 2, 3]  # a checkpoint after step k resumes at k+1: nothing skipped
    assert len(told.steps) == 2


def test_sbatch_warm_flag(tmp_path, skyrl_dataset):  # noqa: F811
    lock = tmp_path / "lock.json"
    LOCK.write(lock)
    base = ["launch", "sbatch", "--dataset", str(skyrl_dataset), "--lockfile", str(lock),
            "--run-dir", str(tmp_path / "run"), "--to", "127.0.0.1:9/pre", "--skip-preflight", "--dry-run"]
    for bad in ("65", "-1"):
        one_error_line(imagefarm_cli(*base, "--warm", bad), "--warm")
    one_error_line(imagefarm_cli(*base, "--prefetch-first", "-3"), "--prefetch-first")
    proc = imagefarm_cli(*base, "--prefetch-first", "16", "--warm", "8", "--", "python", "-c", "pass")
    assert proc.returncode == 0, proc.stderr
    runtime_line = next(line for line in proc.stdout.splitlines() if "runtime_server.sbatch" in line)
    assert "RUNTIME_PREFETCH_FIRST=16" in runtime_line and "RUNTIME_PREFETCH_WARM=8" in runtime_line
    assert "export IMAGEFARM_PREFETCH_WARM=8" in (tmp_path / "run/train.env").read_text()
