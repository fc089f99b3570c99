"""Untrusted base layers read by re-layering (#26): paths cleaned as container engines
clean them, what no tree may hold refused, every cost bounded by a limit, and what
real tools write (Go's archive/tar, zstd) read by meaning. Layers are made in memory
and read with ``read_ops`` as a registry's chunks would arrive."""

from __future__ import annotations

import gzip
import hashlib
import tarfile

import pytest

from imagefarm import oci
from imagefarm.derive.tree import Entry, Limits, Spool, apply, read_ops
from imagefarm.errors import DeriveError
from derivekit import go_tar, gzip_bomb


def member(name: str, data: bytes | None = None, *, kind: bytes = tarfile.REGTYPE, mode: int = 0o644,
           link: str = "", pax: dict[str, str] | None = None) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    info.size = len(data) if data is not None else 0
    info.pax_headers = pax or {}
    return info, data


def d(name: str) -> tuple[tarfile.TarInfo, None]:
    return member(name, kind=tarfile.DIRTYPE, mode=0o755)


def layer(members, compress: str = "gzip") -> tuple[bytes, oci.Descriptor, str]:
    raw = go_tar(members)
    if compress == "gzip":
        blob, media = gzip.compress(raw, mtime=0), oci.OCI_LAYER_GZIP
    elif compress == "zstd":
        import zstandard

        blob, media = zstandard.ZstdCompressor().compress(raw), oci.OCI_LAYER_ZSTD
    else:
        blob, media = raw, oci.OCI_LAYER_TAR
    sha = lambda b: "sha256:" + hashlib.sha256(b).hexdigest()
    return blob, oci.Descriptor(media, sha(blob), len(blob)), sha(raw)


def ops_of(members, *, below=None, limits: Limits = Limits(), spool: Spool | None = None, compress="gzip",
           size: int | None = None):
    blob, desc, diff_id = layer(members, compress)
    if size is not None:
        desc = oci.Descriptor(desc.media_type, desc.digest, size)
    chunks = (blob[i:i + 4096] for i in range(0, len(blob), 4096))
    return read_ops(chunks, desc, diff_id, below=below or {}, spool=spool, where="base x", limits=limits)


def tree_of(*layers):
    t: dict[str, Entry] = {}
    for members in layers:
        apply(t, ops_of(members, below=t))
    return t


# -- paths ---------------------------------------------------------------------------
def test_aliased_names_are_one_path():
    """``a//b``, ``a/./b`` and ``a/x/../b`` name one path: a later layer's alias
    replaces the earlier entry (never kept as three)."""
    t = tree_of([d("testbed"), member("testbed//a", b"1")], [member("testbed/./a", b"2")],
                [member("./testbed/x/../a", b"3")])
    assert sorted(t) == ["testbed", "testbed/a"]
    assert t["testbed/a"].digest == "sha256:" + hashlib.sha256(b"3").hexdigest()


@pytest.mark.parametrize("name", ["../escape", "testbed/../../escape", "./../escape"])
def test_dotdot_out_of_the_root_is_refused(name):
    with pytest.raises(DeriveError, match=r"refused: path .* climbs out of the root"):
        ops_of([member(name, b"x")])


def test_dotdot_inside_the_root_is_cleaned_not_refused():
    assert [p for _, p, _ in ops_of([member("testbed/../escape", b"x")])] == ["escape"]


def test_absolute_path_is_refused():
    with pytest.raises(DeriveError, match=r"refused: absolute path '/etc/passwd'"):
        ops_of([member("/etc/passwd", b"root::0:0::/:/bin/sh\n")])


def test_hard_link_out_of_the_root_is_refused():
    with pytest.raises(DeriveError, match="climbs out of the root"):
        ops_of([member("a", b"x"), member("b", kind=tarfile.LNKTYPE, link="../../a")])


def test_duplicate_entries_are_refused_even_as_aliases():
    with pytest.raises(DeriveError, match=r"refused: two entries for /testbed/x \(member 'testbed/./x'\)"):
        ops_of([d("testbed"), member("testbed//x", b"1"), member("testbed/./x", b"2")])


@pytest.mark.parametrize("order", ["whiteout first", "entry first"])
def test_a_whiteout_and_an_entry_of_one_path_in_one_layer_are_refused(order):
    pair = [member("testbed/.wh.x"), member("testbed/x", b"1")]
    with pytest.raises(DeriveError, match=r"refused: a whiteout and an entry for /testbed/x"):
        ops_of([d("testbed"), *(pair if order == "whiteout first" else pair[::-1])])


def test_an_entry_under_a_file_of_the_same_layer_is_refused():
    with pytest.raises(DeriveError, match=r"refused: member 'etc/passwd/x' is under /etc/passwd, a file"):
        ops_of([d("etc"), member("etc/passwd", b"root"), member("etc/passwd/x", b"1")])


def test_an_entry_under_a_lower_symlink_is_refused():
    """``lib -> usr/lib`` below and ``lib/x`` above: an engine would make ``lib`` a
    directory over the link (or write through it); refused, not guessed."""
    below = tree_of([d("usr"), d("usr/lib"), member("lib", kind=tarfile.SYMTYPE, link="usr/lib", mode=0o777)])
    with pytest.raises(DeriveError, match=r"is under /lib, a symlink -> usr/lib"):
        ops_of([member("lib/deep/x", b"1")], below=below)


def test_an_entry_under_a_whited_out_file_makes_a_directory():
    """Stream order: the layer removes the lower file first, then puts a path under it."""
    below = tree_of([member("x", b"a file")])
    ops_of([member(".wh.x"), member("x/y", b"1")], below=below)  # no refusal


def test_whiteouts_and_entries_apply_in_stream_order():
    """What podman, Docker and containerd unpack: a whiteout removes what stands at that
    point of the stream (this layer's earlier entries too); an opaque directory keeps
    this layer's own entries, before or after its marker."""
    lower = [d("a"), member("a/old", b"o"), d("b"), member("b/old", b"o"), d("c"), member("c/old", b"o")]
    upper = [member("a/new", b"n"), member(".wh.a"),          # a/new, then a: all of a goes
             member(".wh.b"), member("b/new", b"n"),          # b goes, then b/new makes it again
             member("c/before", b"n"), member("c/.wh..wh..opq"), member("c/after", b"n")]
    t = tree_of(lower, upper)
    assert sorted(t) == ["b/new", "c", "c/after", "c/before"]


# -- limits --------------------------------------------------------------------------
def test_a_huge_tar_header_is_refused_before_it_is_read():
    with pytest.raises(DeriveError, match=r"refused: a \d+-byte tar header \(limit 4096"):
        ops_of([member("x", b"1", pax={"SCHILY.xattr.user.big": "v" * 100_000})],
               limits=Limits(header_bytes=4096))


def test_too_many_entries_are_refused():
    with pytest.raises(DeriveError, match=r"refused: more than 10 entries"):
        ops_of([member(f"f{i}", b"") for i in range(11)], limits=Limits(entries=10))


def test_a_gzip_bomb_stops_at_the_limit(tmp_path):
    """1 GiB of zeros in about 1 MB of gzip: the read stops at the limit (here the floor),
    with the spool holding nothing of it afterwards."""
    bomb = gzip_bomb(tmp_path / "blobs", 1 << 30)
    spool = Spool(tmp_path / "spool")

    def chunks():
        with open(bomb.path, "rb") as f:
            while c := f.read(1 << 20):
                yield c

    with pytest.raises(DeriveError, match=r"refused: it unpacks to more than \d+ bytes \(1\d{6} compressed"):
        read_ops(chunks(), bomb.descriptor, bomb.diff_id, below={}, spool=spool, where="base x")
    assert list(spool.root.iterdir()) == [] and spool.used == 0


def test_the_absolute_unpacked_limit_holds_for_well_compressing_layers():
    with pytest.raises(DeriveError, match=r"refused: it unpacks to more than 100000 bytes"):
        ops_of([member("f", bytes(200_000))], limits=Limits(unpacked_bytes=100_000))


def test_small_layers_of_tiny_files_are_not_held_to_the_ratio():
    """A tar of empty files is mostly zero padding (well over 50x in gzip): under the
    floor the ratio does not apply."""
    blob, _, _ = layer([member(f"f{i}", b"") for i in range(2000)])
    assert len(go_tar([member(f"f{i}", b"") for i in range(2000)])) > 50 * len(blob)
    assert len(ops_of([member(f"f{i}", b"") for i in range(2000)])) == 2000


def test_a_blob_longer_than_its_descriptor_is_cut():
    members = [member("f", b"x" * 10_000)]
    blob, desc, _ = layer(members, "tar")
    with pytest.raises(DeriveError, match=r"refused: the registry sent more than its descriptor's 4096 bytes"):
        ops_of(members, compress="tar", size=4096)


def test_the_spool_limit_stops_a_write_and_leaves_nothing(tmp_path):
    spool = Spool(tmp_path / "spool", limit=3 << 20)
    with pytest.raises(DeriveError, match=r"refused: the group's spool holds more than 3145728 bytes"):
        ops_of([member("a", b"a" * (2 << 20)), member("b", b"b" * (2 << 20))], spool=spool)
    assert [p.name for p in spool.root.iterdir() if p.name.startswith(".in-")] == []
    assert spool.used == 2 << 20  # the first file, kept


# -- what real tools write -----------------------------------------------------------
def test_go_tar_type_bits_in_the_mode_are_read_by_meaning():
    """Go's archive/tar writes a directory's mode as 040755: the same tree as 0755."""
    ops = ops_of([d("testbed"), member("testbed/x", b"1", mode=0o4755),
                  member("testbed/l", kind=tarfile.SYMTYPE, link="x", mode=0o777)])
    assert [(p, e.type, oct(e.mode)) for _, p, e in ops] == [
        ("testbed", "d", "0o755"), ("testbed/x", "f", "0o4755"), ("testbed/l", "l", "0o777")]


def test_zstd_layers_read_as_their_gzip_twins():
    members = [d("testbed"), member("testbed/x", b"1" * 5000), member("testbed/.wh.y")]
    assert ops_of(members, compress="zstd") == ops_of(members, compress="gzip")


# -- a batch meets them ----------------------------------------------------------------
def test_a_batch_derives_hostile_groups_plainly_and_relayers_the_rest(cli_env, registry, payload, tmp_path):
    """Three repositories of two bases each: one holds a gzip bomb (8 GiB of zeros in
    8 MB), one a '..' out of the root and a path twice under two spellings, one is
    fine. The batch finishes: the first two are derived plainly with the reason in the
    batch summary, the third is re-layered, and the machine's free disk (statvfs,
    polled through the run) never drops by 2 GiB."""
    import json
    import os
    import threading

    import httpx

    from derivekit import busybox_layer, file_layer, push_base
    from tests.conftest import imagefarm_cli

    blobs = tmp_path / "blobs"
    lower = busybox_layer(blobs)
    bomb = gzip_bomb(blobs)
    dotdot = oci.write_layer([oci.dir_entry("testbed"), oci.file_entry("../escape-dotdot", b"out\n")], blobs)
    aliased = oci.write_layer([oci.dir_entry("testbed"), oci.file_entry("testbed//run.sh", b"1\n"),
                               oci.file_entry("testbed/./run.sh", b"2\n")], blobs)
    repos = {"hostile/bomb": [bomb, file_layer(blobs, "a", "a")],
             "hostile/paths": [dotdot, aliased],
             "hostile/fine": [file_layer(blobs, "a", "a" * 5000), file_layer(blobs, "a", "a" * 5000 + "b")]}
    bases = []
    for repo, uppers in repos.items():
        for i, up in enumerate(uppers):
            ref = f"{registry.host}/{repo}:{i}"
            push_base(tmp_path / f"{repo.replace('/', '-')}-{i}", ref, [lower, up])
            bases.append(ref)
    ds = tmp_path / "list.txt"
    ds.write_text("".join(f"{b}\n" for b in bases))

    def free() -> int:
        st = os.statvfs(tmp_path)
        return st.f_bavail * st.f_frsize

    lowest, done = [free()], threading.Event()
    start = lowest[0]

    def poll() -> None:
        while not done.wait(0.05):
            lowest[0] = min(lowest[0], free())

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        proc = imagefarm_cli("prebuild", "--dataset", str(ds), "--to", f"{registry.host}/hostile-out", "--relayer",
                             "--verify", "none", "--json", env=cli_env, timeout=900)
    finally:
        done.set()
        poller.join()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads(proc.stdout)
    assert state["derived"] == 6 and state["failed"] == 0
    reasons = {f["group"].rsplit(":", 1)[0].split("/", 1)[1]: f["reason"] for f in state["relayer_fallbacks"]}
    assert set(reasons) == {"hostile/bomb", "hostile/paths"}, state["relayer_fallbacks"]
    assert "refused: it unpacks to more than" in reasons["hostile/bomb"]
    assert "refused: path '../escape-dotdot' climbs out of the root" in reasons["hostile/paths"] or \
        "refused: two entries for /testbed/run.sh" in reasons["hostile/paths"]
    for repo in repos:
        tags = [t for t in httpx.get(f"{registry.url}/v2/hostile-out/{repo}/tags/list").json()["tags"]
                if not t.startswith("sha256-")]  # signed artifacts (provenance) beside each image
        assert len(tags) == 2, (repo, tags)
        for tag in tags:
            r = httpx.get(f"{registry.url}/v2/hostile-out/{repo}/manifests/{tag}",
                          headers={"Accept": oci.OCI_MANIFEST})
            relayered = oci.ANN_RELAYER_GROUP in r.json().get("annotations", {})
            assert relayered == (repo == "hostile/fine"), (repo, tag, r.json().get("annotations"))
    assert start - lowest[0] < 2 << 30, f"free disk dropped by {(start - lowest[0]) / 2**30:.1f} GiB"


@pytest.mark.parametrize("var,value", [("IMAGEFARM_RELAYER_MAX_RATIO", "x"), ("IMAGEFARM_RELAYER_MAX_SPOOL_BYTES", "-1")])
def test_a_bad_limit_is_one_line_and_exit_2(var, value, tmp_path):
    import os

    from tests.conftest import imagefarm_cli

    env = {**os.environ, "IMAGEFARM_STATE_DIR": str(tmp_path), var: value}
    proc = imagefarm_cli("prebuild", "--dataset", str(tmp_path / "none.txt"), "--relayer", env=env, timeout=60)
    text = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2 and len(text.splitlines()) == 1 and text.startswith(f"error: {var}="), text
