"""The derived tag: pure, readable, unique, valid."""

from __future__ import annotations

import pytest

from imagefarm.errors import InvalidReference
from imagefarm.names.reference import TAG_RE, parse
from imagefarm.names.tags import derived_reference, derived_tag

BASE = parse("namanjain12/pandas_final:5d6a9e4ec5a0d7c8f2d7a1b3c4e5f60718293a4b")
D1, D2 = "sha256:" + "a" * 64, "sha256:" + "b" * 64
R = "sha256:" + "c" * 64


def test_readable_and_pure():
    ref = derived_reference(BASE, D1, "default", R, "1.58.2", "127.0.0.1:5000/prebuilt")
    assert ref.registry == "127.0.0.1:5000" and ref.repository == "prebuilt/namanjain12/pandas_final"
    assert ref.tag.startswith("5d6a9e4ec5a0d7c8f2d7a1b3c4e5f60718293a4b-oh1.58.2-") and len(ref.tag.split("-")[-1]) == 12
    assert ref == derived_reference(str(BASE), D1, "default", R, "1.58.2", "127.0.0.1:5000/prebuilt/")


@pytest.mark.parametrize("change", [dict(base_digest=D2), dict(recipe_digest=D2), dict(agent_version="1.59.0"),
                                    dict(recipe="other")])
def test_any_input_changes_the_tag(change):
    args = dict(base_digest=D1, recipe="default", recipe_digest=R, agent_version="1.58.2")
    assert derived_tag(BASE, **args) != derived_tag(BASE, **{**args, **change})


def test_recipe_name_shown_unless_default():
    assert "-oh1.58.2-slim-" in derived_tag(BASE, D1, "slim", R, "1.58.2")


def test_long_tags_are_cut_but_stay_unique():
    long = BASE.with_tag("v" * 128)
    t1, t2 = derived_tag(long, D1, "default", R, "1.58.2"), derived_tag(long, D2, "default", R, "1.58.2")
    assert len(t1) == 128 and TAG_RE.match(t1) and t1 != t2


def test_odd_versions_and_digest_only_bases():
    ref = parse("ghcr.io/org/img@" + D1)
    tag = derived_tag(ref, D1, "default", R, "1.0.0+local/build")
    assert TAG_RE.match(tag) and tag.startswith("sha256_aaaaaaaaaaaa-oh1.0.0_local_build-")
    assert TAG_RE.match(derived_tag(BASE, D1, "default", R, "v" * 300))


def test_bad_inputs():
    with pytest.raises(InvalidReference):
        derived_tag(BASE, "md5:abc", "default", R, "1")
    with pytest.raises(InvalidReference, match="shorter --to"):
        derived_reference(BASE, D1, "default", R, "1", "registry.example.com/" + "p" * 250)
