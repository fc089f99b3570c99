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
