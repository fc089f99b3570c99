"""The cheap parts of working without root, tested directly: the builder mirror from
apt sources, a chroot session as root of a user namespace, the payload artifact."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from imagefarm import oci
from imagefarm.derive import AppendPayload
from imagefarm.errors import PayloadError
from imagefarm.payload.mirror import DEFAULT_MIRROR, builder_mirror, host_mirror
from imagefarm.payload.remote import artifact_ref, find, push
from imagefarm.payload.recipe import load_recipe, parse_recipe
from imagefarm.registry import RegistryClient
from imagefarm.host.rootfs import busybox_binary

REPO = Path(__file__).resolve().parents[2]


def _etc(tmp_path: Path, main: str = "", parts: dict[str, str] | None = None) -> Path:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text(main)
    for name, text in (parts or {}).items():
        (etc / "sources.list.d" / name).write_text(text)
    return etc


def test_mirror_from_one_line_sources(tmp_path):
    etc = _etc(tmp_path, "# local mirror\ndeb-src http://src.example/debian bookworm main\n"
                         "deb [arch=amd64 signed-by=/k.gpg] http://mirror.cluster.local/debian/ bookworm main contrib\n")
    assert host_mirror(etc) == "http://mirror.cluster.local/debian"


def test_mirror_from_deb822_skips_disabled_security_and_third_party(tmp_path):
    etc = _etc(tmp_path, parts={
        "a-nodesource.sources": "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n"
                                "Components: main\n",
        "b-cloud.list": "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n",
        "debian.sources": "Types: deb\nURIs: http://old.example/debian\nSuites: bookworm\nComponents: main\n"
                          "Enabled: no\n\n"
                          "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n"
                          "Components: main\n\n"
                          "Types: deb deb-src\nURIs:\n http://m1.example/debian\n http://m2.example/debian\n"
                          "Suites: bookworm bookworm-updates\nComponents: main\n",
    })
    assert host_mirror(etc) == "http://m1.example/debian"


def test_mirror_falls_back_and_flag_wins(tmp_path):
    etc = _etc(tmp_path, "deb http://archive.ubuntu.com/ubuntu jammy main\n")
    assert host_mirror(etc) is None
    assert builder_mirror(None, None, etc) == DEFAULT_MIRROR
    assert builder_mirror("http://recipe/debian", None, etc) == "http://recipe/debian"
    assert builder_mirror("http://recipe/debian", "http://flag/debian", etc) == "http://flag/debian"


def test_mirror_is_not_part_of_the_recipe_digest():
    text = (REPO / "recipes/default.toml").read_text()
    pinned = text.replace("[builder]\n", '[builder]\nmirror = "http://mirror.cluster.local/debian"\n')
    a, b = parse_recipe(text), parse_recipe(pinned)
    assert b.builder.mirror == "http://mirror.cluster.local/debian" and a.builder.mirror is None
    assert a.digest == b.digest and a.tree_digest == b.tree_digest


def test_payload_build_rejects_a_bad_mirror_flag(tmp_path):
    from tests.conftest import imagefarm_cli

    env = {**os.environ, "IMAGEFARM_CACHE_DIR": str(tmp_path), "IMAGEFARM_STATE_DIR": str(tmp_path)}
    proc = imagefarm_cli("payload", "build", "--mirror", "ftp:/nope", env=env)
    assert proc.returncode == 2 and "--mirror" in proc.stderr and "Traceback" not in proc.stderr


def test_chroot_session_as_root_of_a_user_namespace(as_user, cache_dir):
    """What an unprivileged payload build does around each step: /proc mounted, /dev and
    an output directory bound, chroot -- as the normal user, in seconds (busybox rootfs)."""
    root = as_user.work / "jobs" / "chroot" / "rootfs"
    out = as_user.work / "jobs" / "chroot" / "out"
    as_user.job("chroot")
    for d in (root / "bin", root / "usr/bin", root / "etc/ssl", out):
        d.mkdir(parents=True)
    shutil.copy2(busybox_binary(cache_dir), root / "bin/busybox")
    (root / "usr/bin/env").symlink_to("/bin/busybox")
    for p in [root.parent, *root.parent.rglob("*")]:
        os.lchown(p, as_user.user.uid, as_user.user.gid)
    code = ("import sys; from pathlib import Path; from imagefarm.payload.builder import Chroot\n"
            "with Chroot(Path(sys.argv[1]), {'/out': Path(sys.argv[2])}) as ch:\n"
            "    print(ch.run(['/bin/busybox', 'sh', '-c', 'id -u; /bin/busybox ls /proc/1/ >/dev/null && echo proc;"
            " echo written > /out/x; /bin/busybox ls /dev/null']).stdout)\n")
    proc = as_user.run(["unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork", "--kill-child", "--",
                        str(as_user.bin / "python"), "-c", code, str(root), str(out)], as_user.env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == ["0", "proc", "/dev/null"], proc.stdout
    st = (out / "x").stat()
    assert (out / "x").read_text() == "written\n" and st.st_uid == as_user.user.uid  # the user's, on the host
    with open("/proc/self/mounts") as fh:  # nothing leaked into the host's mount table
        assert str(root) not in fh.read()


def test_payload_artifact_round_trip_and_a_foreign_tag(registry, tmp_path):
    recipe = load_recipe("default", REPO / "recipes")
    prefix = f"{registry.host}/artifact-test"
    layer = oci.write_layer([oci.dir_entry("usr"), oci.file_entry("usr/x", b"stand-in payload\n", 0o644)],
                            tmp_path / "blobs")
    p = AppendPayload(layer, recipe.name, recipe.digest, recipe.agent_server_version, tuple(recipe.env))
    with RegistryClient() as c:
        assert find(c, recipe, prefix) is None
        ref, digest, sent = push(c, p, prefix)
        assert sent and ref == artifact_ref(prefix, recipe.digest)
        got = find(c, recipe, prefix)
        assert got is not None and got.layer.path is None
        assert (got.layer.digest, got.layer.diff_id, got.layer.size) == (p.layer.digest, p.layer.diff_id, p.layer.size)
        assert got.source.repository == "artifact-test/imagefarm-payload"
        assert push(c, p, prefix)[1:] == (digest, False)
        # a tag that holds something else is an error, not a miss (nothing derived from it)
        other = load_recipe("broken", REPO / "tests/recipes")
        wrong = artifact_ref(prefix, other.digest)
        m = c.get_manifest(ref)
        c.put_manifest(wrong, m.raw, m.media_type)
        with pytest.raises(PayloadError, match="names recipe"):
            find(c, other, prefix)
