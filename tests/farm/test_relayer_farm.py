"""`prebuild --relayer` on the farm (#18): one repository's bases re-layered as one
Celery task on a real worker, boot-checked with the real payload before their tags
are put, pinned in the lockfile like plain derives; another repository's single base
takes the plain append path. A second run, through the local pool, redoes nothing."""

from __future__ import annotations

import json

import httpx

from imagefarm import oci
from imagefarm.farm.lockfile import Lockfile
from imagefarm.names.reference import parse
from tests.conftest import imagefarm_cli

N, FILES = 6, 120


def test_prebuild_relayer_through_celery(cli_env, fixtures, registry, workers, payload, tmp_path):
    group = [h.ref for h in fixtures.r2e_history(n=N, files=FILES)]
    single = fixtures.r2e_base("namanjain12/tornado_final", "7" * 40).ref
    ds = tmp_path / "list.txt"
    ds.write_text("".join(f"{b}\n" for b in [*group, single]))
    to = f"{registry.host}/farm-relayer"
    lockfile = tmp_path / "lock.json"
    workers.start("derive,verify", concurrency=1)

    def prebuild(executor="celery"):
        return imagefarm_cli("prebuild", "--dataset", str(ds), "--to", to, "--executor", executor, "--relayer",
                             "--verify", "1", "--lockfile", str(lockfile), "--json", env=cli_env, timeout=1200)

    mark = registry.mark()
    first = prebuild()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:] + workers.log()[-3000:]
    state = json.loads(first.stdout)
    assert state["derived"] == N + 1 and state["failed"] == 0 and state["verified"] == 1
    lock = Lockfile.read(lockfile)
    assert {e.base for e in lock.entries} == {str(parse(b)) for b in [*group, single]}
    assert sum(e.verified for e in lock.entries) == 1
    commons = set()
    for e in lock.entries:
        ref = parse(e.image)
        r = httpx.get(f"{registry.url}/v2/{ref.repository}/manifests/{ref.tag}",
                      headers={"Accept": oci.OCI_MANIFEST})
        assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == e.image_digest
        ann = r.json()["annotations"]
        assert ann[oci.ANN_BASE_DIGEST] == e.base_digest
        if e.base == str(parse(single)):
            assert oci.ANN_RELAYER_GROUP not in ann  # a repository of one: the plain path
        else:
            commons.add(ann[oci.ANN_RELAYER_COMMON])
    assert len(commons) == 1
    # the group's images were put by digest and tagged once proven; each tag once
    tag_puts = [a.path for a in registry.accesses(mark)
                if a.method == "PUT" and "/farm-relayer/" in a.path and "/manifests/" in a.path
                and not a.path.rsplit("/", 1)[1].startswith(("sha256:", "sha256-"))]  # not by digest, no attestation
    assert len(tag_puts) == len(set(tag_puts)) == N + 1

    second = prebuild("local")  # the local pool runs the same group task: finds it done
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads(second.stdout)
    assert again["derived"] == 0 and again["skipped"] == N + 1
    assert Lockfile.read(lockfile).entries == lock.entries



def test_a_group_that_cannot_be_relayered_is_derived_one_by_one(cli_env, fixtures, registry, payload, tmp_path):
    """One base of the group is missing: the group fails as a whole, then every base
    takes the plain path, so the others are derived and only the missing one fails."""
    group = [h.ref for h in fixtures.r2e_history(n=N, files=FILES)][:2]
    missing = f"{registry.host}/namanjain12/relayer_final:{'8' * 40}"
    ds = tmp_path / "list.txt"
    ds.write_text("".join(f"{b}\n" for b in [*group, missing]))
    proc = imagefarm_cli("prebuild", "--dataset", str(ds), "--to", f"{registry.host}/farm-relayer-fallback",
                         "--relayer", "--verify", "none", "--json", env=cli_env, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    state = json.loads(proc.stdout)
    assert state["derived"] == 2 and state["failed"] == 1
    assert [f["base"] for f in state["failures"]] == [str(parse(missing))]
    assert "deriving them one by one" in proc.stderr
