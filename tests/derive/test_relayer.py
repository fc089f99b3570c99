"""Re-layering (#18) on R2E-shaped bases of one repository, in a real registry.

Six commits of one git repository (shared OS layer, then checkout and venv layers of
their own) are re-layered once per module; what the tests check is read back from
the registry (manifests, blobs, its access log). A runtime start of a sibling is in
tests/runtime/test_relayer_runtime.py.
"""

from __future__ import annotations

import io
import json

import pytest

from imagefarm import oci
from imagefarm.derive import Appender
from imagefarm.derive.relayer import Layers, Relayer, prove
from imagefarm.derive.tree import Entry, Spool, read_ops, write_layer
from imagefarm.errors import DeriveError
from imagefarm.names.reference import parse
from imagefarm.registry import RegistryClient
from derivekit import BUSYBOX, push_base

N, FILES = 6, 120


@pytest.fixture(scope="module")
def history(fixtures):
    return fixtures.r2e_history(n=N, files=FILES)


@pytest.fixture(scope="module")
def rl_settings(settings, registry):
    return settings.model_copy(update={"to": f"{registry.host}/relayered"})


@pytest.fixture(scope="module")
def rl(rl_settings):
    with Appender(rl_settings, RegistryClient(rl_settings, credentials={})) as a:
        yield Relayer(a)


@pytest.fixture(scope="module")
def group(rl, history, payload):
    return rl.relayer([h.ref for h in history], payload)


def manifest(client, ref: str, digest: str):
    return client.get_manifest(parse(ref).with_digest(digest))


def test_images_share_lower_and_common_layers_and_keep_small_own_layers(group, history, rl, payload):
    client = rl.client
    assert [r.base for r in group.results] == [str(parse(h.ref)) for h in history]
    own_sizes = []
    for r, h in zip(group.results, history):
        m = manifest(client, r.image, r.digest)
        base = client.get_manifest(parse(h.ref))
        assert [d.digest for d in m.layers] == [base.layers[0].digest, group.common.digest,
                                                m.layers[2].digest, payload.layer.digest]
        assert m.annotations[oci.ANN_RELAYER_COMMON] == group.common.digest
        assert m.annotations[oci.ANN_RELAYER_GROUP] == group.group
        assert m.annotations[oci.ANN_BASE_DIGEST] == base.digest == r.base_digest
        assert client.head_manifest(parse(r.image)).digest == r.digest  # tagged: lookups find it
        cfg = json.loads(client.get_blob_bytes(parse(r.image), m.config.digest))
        assert cfg["rootfs"]["diff_ids"][1] == group.common.diff_id
        assert len(cfg["history"]) == 4 and cfg["history"][0]["created_by"] == "debootstrap bookworm"
        upper = sum(d.size for d in base.layers[1:])
        own_sizes.append(m.layers[2].size)
        assert m.layers[2].size * 50 < upper, (m.layers[2].size, upper)
    assert group.common.size > 10 * max(own_sizes)


def test_tree_comparison_passes_on_every_image(group, history, rl, tmp_path):
    assert len(group.proofs) == N and all(p.paths > 10_000 for p in group.proofs)
    layers = Layers(rl.client, Spool(tmp_path / "spool"))
    # the group's own proofs read every image back from the registry; stand-alone, two more
    for r, h in list(zip(group.results, history))[:2]:
        proof = prove(rl.client, parse(h.ref).with_digest(r.base_digest), parse(r.image).with_digest(r.digest),
                      tmp_path, layers)
        assert proof.paths == group.proofs[group.results.index(r)].paths


def test_umoci_unpacks_an_image_to_its_base_plus_the_payload(group, rl_settings, payload, tmp_path):
    """The independent proof (imagefarm/farm/treecheck.py: skopeo + umoci + os.lstat, no
    code of imagefarm.derive) on the group's last image (the one with most siblings
    before it; each proof unpacks two ~10,000-path trees, so not all six: suite time)."""
    from imagefarm.farm.treecheck import prove_tree

    for r in group.results[-1:]:
        proof = prove_tree(rl_settings, f"{parse(r.image).name}@{r.digest}", payload_digest=payload.layer.digest,
                           work=tmp_path)
        assert proof.ok and proof.paths > 10_000, (r.image, proof.paths, proof.differences[:10])


def test_own_layers_hold_whiteouts_for_deleted_common_files(group, rl):
    """The history deletes a file every 4th commit: those images' own layers hide it."""
    seen = []
    for layer in group.own:
        with rl.client.open_blob(parse(group.results[0].image), layer.digest) as chunks:
            ops = read_ops(chunks, layer.descriptor, layer.diff_id, below={}, spool=None, where="own")
        seen += [p for op, p, _ in ops if op == "wh"]
    assert any(p.startswith("testbed/relayer/mod_") for p in seen), seen


def test_altered_image_fails_naming_the_path(group, history, rl, rl_settings, tmp_path):
    client, r, h = rl.client, group.results[1], history[1]
    ref = parse(r.image)
    m = manifest(client, r.image, r.digest)
    own = m.layers[2]
    spool = Spool(tmp_path / "spool")
    with client.open_blob(ref, own.digest) as chunks:
        ops = read_ops(chunks, own, None, below={}, spool=spool, where="own")
    digest, size = spool.put(io.BytesIO(b"#!/bin/bash\nexit 0  # tampered\n"))
    items = [(p, e) for op, p, e in ops if op == "add"] + [(p, None) for op, p, _ in ops if op == "wh"]
    items = [(p, e) for p, e in items if p != "testbed/run_tests.sh"]
    items.append(("testbed/run_tests.sh", Entry("f", 0o755, 0, 0, digest=digest, size=size)))
    bad = write_layer(items, tmp_path / "layers", spool)
    cfg = json.loads(client.get_blob_bytes(ref, m.config.digest))
    cfg["rootfs"]["diff_ids"][2] = bad.diff_id
    cfg_blob = oci.canonical_json(cfg)
    doc = json.loads(m.raw)
    doc["layers"][2] = bad.descriptor.to_json()
    doc["config"] = {"mediaType": oci.OCI_CONFIG, "digest": oci.sha256_digest(cfg_blob), "size": len(cfg_blob)}
    raw = oci.canonical_json(doc)
    client.upload_blob(ref, bad.digest, bad.path)
    client.upload_blob(ref, oci.sha256_digest(cfg_blob), cfg_blob)
    altered = client.put_manifest(ref.with_digest(oci.sha256_digest(raw)), raw, oci.OCI_MANIFEST)
    with pytest.raises(DeriveError, match=r"differs from its base plus the payload at /testbed/run_tests\.sh: "):
        prove(client, parse(h.ref).with_digest(r.base_digest), ref.with_digest(altered), tmp_path)
    from imagefarm.farm.treecheck import prove_tree  # and the independent proof sees it too

    bad = prove_tree(rl_settings, f"{ref.name}@{altered}", work=tmp_path)
    assert [d.split(":", 1)[0] for d in bad.differences] == ["testbed/run_tests.sh"], bad.differences


def test_same_group_gives_the_same_digests(group, history, rl, registry, payload):
    """Into another prefix, by digest only: the same layers and manifests (no manifest
    names its target), and no tag until the images are published."""
    first = rl.relayer([h.ref for h in history], payload, to=f"{registry.host}/again", publish=False)
    assert first.common.digest == group.common.digest
    assert [l.digest for l in first.own] == [l.digest for l in group.own]
    assert [r.digest for r in first.results] == [r.digest for r in group.results]
    assert all(rl.client.head_manifest(parse(r.image)) is None for r in first.results)


def test_bad_share_is_refused(rl):
    with pytest.raises(DeriveError, match="share 1.5"):
        Relayer(rl.a, share=1.5)


def test_tar_members_are_checked_against_the_layer_digest(group, rl):
    """A blob read back under a wrong descriptor is refused, not trusted."""
    layer = group.own[0]
    wrong = oci.Descriptor(layer.media_type, "sha256:" + "0" * 64, layer.size)
    with rl.client.open_blob(parse(group.results[0].image), layer.digest) as chunks:
        with pytest.raises(DeriveError, match="another digest"):
            read_ops(chunks, wrong, None, below={}, spool=None, where="own")


CRASHING = """
import json, sys
from imagefarm import oci
from imagefarm.derive import Appender, AppendPayload
from imagefarm.derive.relayer import Relayer
from imagefarm.settings import Settings
a = json.loads(sys.argv[1])
p = a["payload"]
payload = AppendPayload(oci.Layer.from_json(p["layer"]), p["name"], p["digest"], p["version"], tuple(p["env"]))
with Appender(Settings(state_dir=a["state"], cache_dir=a["cache"])) as ap:
    Relayer(ap).relayer(a["bases"], payload, to=a["to"])
"""


def test_sigkill_mid_group_then_rerun_finishes_without_uploading_again(group, history, rl, registry, payload,
                                                                         tmp_path):
    """SIGKILL once the common layer has landed (its digest is known: the same group
    gives the same blobs): no tag is left behind, and the rerun uploads that layer no
    more and puts every tag."""
    import signal
    import subprocess
    import sys
    import time

    to = f"{registry.host}/crash"
    arg = {"payload": {"layer": payload.layer.to_json(), "name": payload.recipe_name,
                       "digest": payload.recipe_digest, "version": payload.agent_server_version,
                       "env": list(payload.env)},
           "state": str(tmp_path / "state"), "cache": str(rl.a.settings.cache_dir), "to": to,
           "bases": [h.ref for h in history]}
    mark = registry.mark()
    proc = subprocess.Popen([sys.executable, "-c", CRASHING, json.dumps(arg)])
    common_put = lambda log: [a for a in log if a.method == "PUT" and a.status == 201
                              and group.common.digest.split(":")[1] in a.path]
    deadline = time.monotonic() + 300
    while not common_put(registry.accesses(mark)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    landed = registry.accesses(mark)
    assert len(common_put(landed)) == 1
    assert all(rl.client.head_manifest(parse(r.image.replace("/relayered/", "/crash/"))) is None
               for r in group.results)  # no tag survived the crash
    mark = registry.mark()
    again = rl.relayer([h.ref for h in history], payload, to=to)
    log = registry.accesses(mark)
    assert common_put(log) == []
    assert [r.digest for r in again.results] == [r.digest for r in group.results]
    assert all(rl.client.head_manifest(parse(r.image)).digest == r.digest for r in again.results)
    tag_puts = [i for i, a in enumerate(log) if a.method == "PUT" and "/manifests/" in a.path
                and "sha256:" not in a.path.rsplit("/", 1)[1] and not a.path.endswith(".prov")]
    assert len(tag_puts) == N
    assert min(tag_puts) > max(i for i, a in enumerate(log) if "/blobs/" in a.path)  # tags last


def test_an_image_keeping_a_lower_file_the_common_layer_replaces(rl, registry, payload, tmp_path):
    """Three of four images rewrite a lower file (it goes into the common layer); the
    fourth keeps the lower one and hard-links a lower file: its own layer carries both
    contents, read again from the lower layer, and every image proves equal."""
    import tarfile

    blobs = tmp_path / "blobs"
    lower = oci.write_layer([oci.dir_entry("bin"), ("bin/busybox", BUSYBOX, None), oci.symlink_entry("bin/sh", "busybox"),
                             oci.dir_entry("etc"), oci.file_entry("etc/motd", b"lower\n")], blobs)
    link = tarfile.TarInfo("testbed/busybox-link")
    link.type, link.linkname, link.mode = tarfile.LNKTYPE, "bin/busybox", 0o755
    uppers = [oci.write_layer([oci.file_entry("etc/motd", b"upper\n"), oci.dir_entry("testbed"),
                               oci.file_entry(f"testbed/f{i}", b"%d" % i)], blobs) for i in range(3)]
    uppers.append(oci.write_layer([oci.dir_entry("testbed"), ("testbed/busybox-link", None, link)], blobs))
    refs = []
    for i, up in enumerate(uppers):
        ref = f"{registry.host}/fixtures/keeps-lower:{i}"
        push_base(tmp_path / f"img{i}", ref, [lower, up])
        refs.append(ref)
    got = rl.relayer(refs, payload, to=f"{registry.host}/keeps")
    assert len(got.proofs) == 4
    with rl.client.open_blob(parse(got.results[3].image), got.own[3].digest) as chunks:
        ops = read_ops(chunks, got.own[3].descriptor, None, below={}, spool=None, where="own")
    paths = {p for op, p, _ in ops if op == "add"}
    assert {"etc/motd", "testbed/busybox-link"} <= paths



@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_images_made_by_buildah_relayer_and_prove(rl, settings, registry, payload, tmp_path, compression):
    """Layers Go's archive/tar wrote (type bits in the mode, PAX headers, buildah's own
    order; zstd as podman and buildah push it): re-layered and proven equal by meaning,
    the hard link kept as one."""
    from derivekit import buildah_group

    refs = buildah_group(settings, registry.host, "buildah/proj", tmp_path, 3, compression)
    import tarfile

    client = rl.client
    base = client.get_manifest(parse(refs[0]))
    upper = base.layers[-1]
    assert upper.media_type == (oci.OCI_LAYER_ZSTD if compression == "zstd" else oci.OCI_LAYER_GZIP)
    if compression == "gzip":  # the fixture is what Go writes: a directory's mode field holds 040000
        with client.open_blob(parse(refs[0]), upper.digest) as chunks:
            with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r:gz") as tar:
                assert any(m.isdir() and m.mode & 0o170000 == 0o040000 for m in tar)
    got = rl.relayer(refs, payload, to=f"{registry.host}/buildah-{compression}")
    assert len(got.proofs) == 3 and got.lower == 1
    assert got.common is not None and all(l.size < got.common.size for l in got.own)
    with client.open_blob(parse(got.results[0].image), got.common.digest) as chunks:
        ops = read_ops(chunks, got.common.descriptor, got.common.diff_id, below={}, spool=None, where="common")
    linked = {p: e.link for _, p, e in ops if e is not None and e.type == "f" and e.link}
    assert linked == {"testbed/README.link": "testbed/README"}  # one inode, as in the bases
    # mtimes: exact where the images agree; mod_5.py gets the two images' that agree
    assert [p.mtime_differs for p in got.proofs] == [0, 0, 1] and got.mtime_differs == 1
