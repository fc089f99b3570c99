"""Choosing among images of two agent-server versions (#20): the lockfile's keys and
picks, and the lookup's rule (recipe name, digest at the image's version, the version
asked for, else the newest verified) against the real fixture registry, with
stand-in payloads: what is chosen depends only on annotations, not on payload bytes."""

import dataclasses

import pytest

from imagefarm.errors import ImageRefused, InvalidRequest
from imagefarm.farm import attest
from imagefarm.farm.lockfile import Entry, Lockfile
from imagefarm.names.reference import parse
from imagefarm.serve.lookup import Lookup
from imagefarm.settings import Settings

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


def test_registry_two_versions_side_by_side(settings, fixtures, registry, small_payload):
    """Both versions derived onto one base: each is found when asked; unasked, the
    newest verified; a derived reference of the other version is refused; a build
    whose digest is not its recipe's at its version is never served."""
    from imagefarm.derive import Appender

    to = f"{registry.host}/vsel"
    base = fixtures.r2e_base("namanjain12/tornado_final", "7" * 40).ref
    lk = Lookup(Settings(**{**settings.model_dump(), "to": to}), ttl=300, miss_ttl=0)
    rec = lk.recipe
    appender = Appender(settings)
    try:
        made = {v: appender.derive(base, dataclasses.replace(small_payload, recipe_digest=rec.at_version(v).digest,
                                                             agent_server_version=v), to=to)
                for v in (OLD, NEW)}
        # a stale build claiming 1.56.0 with another version's digest
        appender.derive(base, dataclasses.replace(small_payload, recipe_digest=rec.at_version(NEW).digest,
                                                  agent_server_version="1.56.0"), to=to)
    finally:
        appender.close()
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
    lk2 = Lookup(Settings(**{**settings.model_dump(), "to": to, "agent_server_version": NEW}))
    assert lk2.resolve(base).digest == made[NEW].digest
    lk2.close()
