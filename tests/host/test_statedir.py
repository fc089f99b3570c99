"""State directories are private: made 0700, refused when another user (or a loose mode)
could have planted a containers.conf in them."""

import os

import pytest

from imagefarm.host.containers import container_env
from imagefarm.errors import ConfigError
from imagefarm.settings import Settings
from imagefarm.host.statedir import private_dir, state_subdir

NOBODY = 65534


def test_made_private_and_reused(tmp_path):
    d = private_dir(tmp_path / "a" / "state")
    assert oct(d.stat().st_mode & 0o777) == "0o700"
    assert private_dir(d) == d  # ours and 0700: accepted again
    sub = state_subdir(d, "runtime", "tmp")
    assert all(oct(p.stat().st_mode & 0o777) == "0o700" for p in (d / "runtime", sub))


def test_refused_when_another_user_made_it_first(tmp_path):
    planted = tmp_path / "imagefarm-runtime-4242"
    (planted / "containers").mkdir(parents=True)
    (planted / "containers" / "containers.conf").write_text('[engine]\nruntime = "/tmp/evil"\n')
    os.chmod(planted, 0o700)
    os.chown(planted, NOBODY, NOBODY)  # the tests run as root: another user made it
    with pytest.raises(ConfigError, match=f"belongs to uid {NOBODY}, not to you"):
        private_dir(planted)
    with pytest.raises(ConfigError, match="belongs to uid"):
        container_env(Settings(state_dir=planted))  # podman is never pointed at its containers.conf


def test_refused_when_others_may_write_or_it_is_a_symlink(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    with pytest.raises(ConfigError, match="mode 0755, not 0700.*chmod 700"):
        private_dir(loose)
    link = tmp_path / "link"
    link.symlink_to(private_dir(tmp_path / "real"))
    with pytest.raises(ConfigError, match="not a directory"):
        private_dir(link)


def test_refused_under_a_parent_another_user_could_swap(tmp_path):
    """A world-writable, non-sticky directory of another user: anything below it could be
    swapped, so a state directory there is refused, naming that directory -- as a
    library call and as the CLI's one line with exit 2."""
    from tests.conftest import imagefarm_cli

    theirs = tmp_path / "shared"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    os.chmod(theirs, 0o777)
    with pytest.raises(ConfigError, match=f"parent {theirs} belongs to uid {NOBODY}"):
        private_dir(theirs / "mine" / "state")
    os.chown(theirs, 0, 0)  # root's, but writable by all and not sticky: still refused
    with pytest.raises(ConfigError, match=f"parent {theirs} is writable by others"):
        state_subdir(theirs / "state", "runtime")
    os.chmod(theirs, 0o1777)  # sticky, like /tmp: others cannot rename what is ours in it
    assert private_dir(theirs / "state") == theirs / "state"
    os.chown(theirs, NOBODY, NOBODY)
    os.chmod(theirs, 0o777)
    env = {**os.environ, "IMAGEFARM_STATE_DIR": str(theirs / "state2")}
    p = imagefarm_cli("status", env=env)
    assert p.returncode == 2 and str(theirs) in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_a_plan_on_a_fresh_state_dir_makes_it_private(tmp_path, registry):
    """The manifest cache (what ``prebuild --plan`` fills first) makes the state directory
    through the one helper: 0700, so the ``prebuild`` that follows accepts it."""
    from imagefarm.registry.cache import ManifestCache
    from imagefarm.registry import manifests as mf

    state = tmp_path / "fresh" / "state"
    raw = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}'
    ManifestCache(state / "manifests").put(mf.parse_manifest(raw))
    assert oct(state.stat().st_mode & 0o777) == "0o700" and private_dir(state) == state
    # a digest header is checked before it becomes a path
    cache = ManifestCache(state / "manifests")
    assert cache.get("sha256:../../../etc/passwd", "x") is None and cache.get("../x", "x") is None
