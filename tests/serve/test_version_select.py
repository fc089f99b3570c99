"""Choosing among images of two agent-server versions (#20): the lockfile's keys and
picks, and the lookup's rule (recipe name, digest at the image's version, the version
asked for, else the newest verified) against the real fixture registry, with
stand-in payloads: what is chosen depends only on annotations, not on payload bytes."""

import dataclasses

import httpx
import pytest

from imagefarm.errors import ImageRefused, InvalidRequest
from imagefarm.farm import attest
from imagefarm.farm.lockfile import Entry, Lockfile
from imagefarm.names.reference import parse
from imagefarm.payload.recipe import load_recipe
from imagefarm.serve.lookup import Lookup
from imagefarm.serve.launch import check_versions, trainer_versions
from imagefarm.settings import Settings
from tests.serve.test_lookup import api, to  # noqa: F401 - the lookup API server fixture, reused

OLD, NEW = "1.57.0", "1.58.2"


def entry(iid: str, recipe, version: str, *, verified: bool = True, digest: str | None = None,
          base: str = "docker.io/namanjain12/pandas_final:abc") -> Entry:
    n = f"{abs(hash((iid, recipe.name, version))) % 10**12:012d}"
    return Entry(iid, "train", base, "sha256:" + "1" * 64, f"reg.invalid/p/namanjain12/pandas_final:abc-oh{version}",
                 "sha256:" + n.ljust(64, "0"), recipe.name, digest or recipe.at_version(version).digest,
                 version, verified)


@pytest.fixture
def recipe(settings):
    lk = Lookup(settings)
    yield lk.recipe
    lk.close()


def test_lockfile_keys_and_picks(recipe, tmp_path):
    first = Lockfile.merge(None, [entry("i1", recipe, OLD), entry("i2", recipe, OLD)])
    # a batch at a second version: the first version's entries stay
    both = Lockfile.merge(first, [entry("i1", recipe, NEW, verified=False)])
    assert sorted(e.key for e in both.entries) == [("i1", "default", OLD), ("i1", "default", NEW),
                                                   ("i2", "default", OLD)]
    assert both.for_instance("i1", version=OLD).agent_server_version == OLD
    assert both.for_instance("i1", version=NEW).agent_server_version == NEW
    assert both.for_instance("i1", version="1.0.0") is None
    assert both.for_instance("i1", recipe="v0") is None
    # no version asked: verified first (the old one), then the newest
    assert both.for_instance("i1").agent_server_version == OLD
    again = Lockfile.merge(both, [entry("i1", recipe, NEW, verified=True)])  # same key: replaced, not doubled
    assert len(again.entries) == 3
    assert again.for_instance("i1").agent_server_version == NEW
    assert again.for_base("namanjain12/pandas_final:abc").agent_server_version == NEW
    assert again.for_base("namanjain12/pandas_final:abc", version=OLD).agent_server_version == OLD
    assert again.versions() == {OLD: 2, NEW: 1}
    back = Lockfile.read(again.write(tmp_path / "lock.json"))
    assert back.entries == again.entries


def test_lookup_lockfile_rules(settings, recipe, tmp_path):
    stale = entry("i1", recipe, NEW, digest="sha256:" + "9" * 64)  # built from another recipe at NEW
    lock = Lockfile((entry("i1", recipe, OLD), stale))
    lk = Lookup(Settings(**{**settings.model_dump(), "to": "127.0.0.1:1/unused"}), lockfile=lock)
    base = "namanjain12/pandas_final:abc"
    assert lk.resolve(base).agent_server_version == OLD  # the stale newer entry is passed over
    assert lk.resolve(base, version=OLD).agent_server_version == OLD
    assert lk.resolve(base, version=OLD, recipe="default").source == "lockfile"
    for bad in ("1.5 8", "latest", "../1"):
        with pytest.raises(InvalidRequest, match="not a version"):
            lk.resolve(base, version=bad)
    for bad in ("../recipes/default", "/etc/passwd", "Nope"):
        with pytest.raises(InvalidRequest, match="recipe"):
            lk.resolve(base, recipe=bad)
    with pytest.raises(InvalidRequest, match="no recipe named"):
        lk.resolve(base, recipe="nosuch")
    lk.close()


def derive_versions(settings, small_payload, recipe, base: str, to: str, versions) -> dict:
    """The stand-in payload derived onto ``base`` as the recipe at each version:
    {version: result}; a (version, digest) pair derives a build claiming that version
    with another digest (a stale one)."""
    from imagefarm.derive import Appender

    with Appender(settings) as appender:
        return {v if isinstance(v, str) else v[0]: appender.derive(base, dataclasses.replace(
            small_payload, agent_server_version=v if isinstance(v, str) else v[0],
            recipe_digest=recipe.at_version(v).digest if isinstance(v, str) else v[1]), to=to)
            for v in versions}


def test_registry_two_versions_side_by_side(settings, fixtures, registry, small_payload):
    """Both versions derived onto one base: each is found when asked; unasked, the
    newest verified; a derived reference of the other version is refused; a build
    whose digest is not its recipe's at its version is never served."""
    to = f"{registry.host}/vsel"
    base = fixtures.r2e_base("namanjain12/tornado_final", "7" * 40).ref
    lk = Lookup(Settings(**{**settings.model_dump(), "to": to}), ttl=300, miss_ttl=0)
    rec = lk.recipe
    made = derive_versions(settings, small_payload, rec, base, to,
                           [OLD, NEW, ("1.56.0", rec.at_version(NEW).digest)])
    assert made[OLD].image != made[NEW].image and f"-oh{OLD}-" in made[OLD].image
    assert lk.resolve(base, version=OLD).digest == made[OLD].digest
    assert lk.resolve(base, version=NEW).digest == made[NEW].digest
    assert lk.resolve(base, version="1.56.0") is None
    assert lk.resolve(base).digest == made[NEW].digest  # none verified: the newest
    attest.record(lk.client, parse(made[OLD].image), made[OLD].digest, {"alive": True})
    assert lk.resolve(base).digest == made[NEW].digest  # cached answer until invalidated
    lk.invalidate(base)
    hit = lk.resolve(base)  # now the newest *verified* one
    assert (hit.digest, hit.verified, hit.agent_server_version) == (made[OLD].digest, True, OLD)
    assert lk.resolve(base, version=NEW).digest == made[NEW].digest  # a version asked still wins
    assert lk.resolve(made[NEW].image).digest == made[NEW].digest
    with pytest.raises(ImageRefused, match=f"not {OLD} as asked"):
        lk.resolve(made[NEW].image, version=OLD)
    lk.close()
    # the settings' version (--agent-server-version) is the default question
    lk2 = Lookup(Settings(**{**settings.model_dump(), "to": to, "agent_server_version": OLD}), miss_ttl=0)
    assert lk2.resolve(base).digest == made[OLD].digest
    # another recipe (V0's, here the test one) is not held to the settings' version
    other = load_recipe("broken", settings.recipes_dir)
    theirs = derive_versions(settings, dataclasses.replace(small_payload, recipe_name=other.name), other, base, to,
                             [NEW])[NEW]
    assert lk2.resolve(base, recipe="broken").digest == theirs.digest
    assert lk2.resolve(base, recipe="broken", version=OLD) is None
    lk2.close()


def test_http_api_selects_by_version(api, settings, fixtures, small_payload, recipe, to):  # noqa: F811
    h = {"X-API-Key": "k3y"}
    base = fixtures.r2e_base("namanjain12/aiohttp_final", "8" * 40).ref
    made = derive_versions(settings, small_payload, recipe, base, to, [OLD, NEW])
    for version, want in ((OLD, made[OLD].digest), (NEW, made[NEW].digest), (None, made[NEW].digest)):
        params = {"image": base, **({"agent_server_version": version} if version else {})}
        for _ in range(2):  # cold, then the warm path (peek) under the same key
            r = httpx.get(f"{api}/v1/lookup", params=params, headers=h)
            assert r.status_code == 200 and r.json()["digest"] == want, r.text
    r = httpx.get(f"{api}/v1/lookup", params={"image": base, "agent_server_version": "1.0.0"}, headers=h)
    assert r.status_code == 404 and r.json()["build"].endswith("--agent-server-version 1.0.0")
    for bad in ({"agent_server_version": "x y"}, {"recipe": "../etc"}, {"agent_server_version": "9" * 80}):
        r = httpx.get(f"{api}/v1/lookup", params={"image": base, **bad}, headers=h)
        assert r.status_code in (400, 422), r.text
    r = httpx.post(f"{api}/v1/lookup", json={"images": [base], "agent_server_version": OLD}, headers=h)
    assert r.json()["found"][base]["digest"] == made[OLD].digest
    r = httpx.post(f"{api}/v1/lookup", json={"images": [base], "agent_server_version": "latest"}, headers=h)
    assert r.status_code == 400 and "not a version" in r.json()["detail"]


def test_version_check_edges():
    """The comparison preflight prints: both sides and both fixes, a mixed trainer, no SDK."""
    both = dict.fromkeys(("openhands-sdk", "openhands-workspace", "openhands-agent-server"), NEW)
    kw = {"rebuild": "imagefarm prebuild -d D --to T --lockfile L", "pin_with": "py -m pip install"}
    assert check_versions("py", both, {NEW: 3}, **kw).ok
    off = check_versions("py", both, {OLD: 2, NEW: 1}, **kw)
    assert not off.ok and f"openhands-sdk {NEW}" in off.problem and f"{OLD} (2 instances)" in off.problem
    assert f"`imagefarm prebuild -d D --to T --lockfile L --agent-server-version {NEW}`" in off.problem
    assert f"`py -m pip install openhands-sdk=={OLD} openhands-workspace=={OLD} openhands-agent-server=={OLD}`" in off.problem
    mixed = check_versions("py", {**both, "openhands-agent-server": OLD}, {NEW: 1}, **kw)
    assert not mixed.ok and "mixes versions" in mixed.problem and f"openhands-agent-server=={NEW}" in mixed.problem
    assert check_versions("py", dict.fromkeys(both), {OLD: 1}, **kw).ok  # no SDK there (a V0 trainer)
    import sys

    assert trainer_versions([sys.executable]) == dict.fromkeys(both)  # this interpreter has none of them
    from imagefarm.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot run it"):
        trainer_versions(["/nonexistent/python"])
    with pytest.raises(ConfigError, match="not a Python"):
        trainer_versions(["/bin/false"])
