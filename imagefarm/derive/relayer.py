"""Re-layer the bases of one repository so the files they share are pulled once.

R2E-Gym bases of one repository share their OS layers (same digests) but each holds
its own checkout and venv layers, although consecutive commits share nearly every
file. For a group of such bases, each derived image here is:

    the group's shared lower layers (unchanged blobs)
    + one group-common layer (the files most of the group holds identically: the
      same bytes and digest in every image of the group)
    + one small layer of this image's own (files changed or added against the
      common layer, whiteouts for common or lower files it lacks)
    + the agent payload (as ``append`` adds it)

and its tree equals its base's plus the payload (``prove``, from the registry's
blobs, before any tag is put). The layers are read once, streamed (``tree``); what
is written is deterministic (sorted entries, fixed gzip header), so the same group
gives the same digests, and a rerun after a crash uploads nothing the registry
already has (blobs are HEAD-skipped, tags are put last). The tag is the one a plain
derive of the base gets: lookups find re-layered images exactly as plain ones.

Limits: every tree is kept on disk (one SQLite file per group, under the work
directory) and file contents once per digest while the group runs; what reading an
untrusted base layer may cost is bounded by the ``IMAGEFARM_RELAYER_*`` settings, and a
group that meets a limit fails as a whole (the farm then derives its bases plainly and
says why). tar, tar+gzip and tar+zstd layers. A common entry carries the mtime most of
the group's images hold it with (exact wherever they agree); each proof counts the paths
whose mtime is not their base's. Hard links as ``tree`` says.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from imagefarm import oci
from imagefarm.errors import DeriveError
from imagefarm.host.statedir import state_subdir
from imagefarm.names.reference import Prefix, Reference, mirrored, parse
from imagefarm.names.tags import derived_reference
from imagefarm.registry import RegistryClient
from imagefarm.registry.manifests import Manifest
from imagefarm.settings import Settings
from . import provenance, surgery
from .append import Appender, existing_derive, payload_home
from .tree import (_ENTRY_COLS, _SAME, Entry, Limits, Op, Spool, StoredTree, Tree, TreeStore, _entry, _key, _path,
                   apply, first_difference, link_groups, read_ops, settle_links, write_layer)
from .values import AppendPayload, DeriveResult, PayloadLike

#: bump when the choice of common files changes: a group id names the algorithm too
ALGORITHM = 1


@dataclass(frozen=True, slots=True)
class Proof:
    """A derived image's tree equals its base's plus the payload."""

    image: str
    paths: int           #: paths compared
    mtime_differs: int   #: paths whose mtime is not the base's (not compared; see ``tree``)


@dataclass(frozen=True)
class GroupResult:
    """One re-layered group: per-image results (in the order asked) and the layers made."""

    group: str                   #: the group id (annotation ``dev.imagefarm.relayer.group``)
    results: tuple[DeriveResult, ...]
    proofs: tuple[Proof, ...]
    lower: int = 0               #: shared lower layers kept as they are
    common: oci.Layer | None = None
    own: tuple[oci.Layer, ...] = ()
    bytes_read: int = 0          #: layer bytes read from the registry

    @property
    def mtime_differs(self) -> int:
        """Paths, over the group's images, whose mtime is not their base's (see ``choose_common``)."""
        return sum(p.mtime_differs for p in self.proofs)


def group_id(base_digests: Sequence[str], share: float) -> str:
    """Names what was re-layered: the set of base digests, the share and the algorithm."""
    return oci.sha256_digest(oci.canonical_json({"algorithm": ALGORITHM, "bases": sorted(set(base_digests)),
                                                 "share": share}))


class Layers:
    """Layers applied to trees on disk (a ``TreeStore``). The tree of each chain of layers
    read is remembered, so the group's lower layers (and a proof's common layer) are read
    once; ops are kept in memory only for layers asked to (the payload: one, small)."""

    def __init__(self, client: RegistryClient, spool: Spool, limits: Limits = Limits(),
                 store: TreeStore | None = None) -> None:
        self.client, self.spool, self.limits = client, spool, limits
        self.store = store or TreeStore(spool.root / ".trees.sqlite")
        self._chains: dict[tuple[str, ...], tuple[StoredTree, bool]] = {}
        self._ops: dict[str, list[Op]] = {}
        self.bytes_read = 0

    def ops(self, ref: Reference, desc: oci.Descriptor, diff_id: str | None, below: Tree, *,
            keep: bool = False, cache: bool = False) -> list[Op]:
        got = self._ops.get(desc.digest)
        if got is not None:
            return got
        with self.client.open_blob(ref, desc.digest) as chunks:
            ops = read_ops(chunks, desc, diff_id, below=below, spool=self.spool if keep else None,
                           where=f"{ref.name}@{ref.digest or ref.tag}", limits=self.limits)
        self.bytes_read += desc.size
        if cache:
            self._ops[desc.digest] = ops
        return ops

    def tree(self, ref: Reference, layers: Sequence[oci.Descriptor], diff_ids: Sequence[str | None],
             start: StoredTree | None = None, *, keep: bool = False) -> StoredTree:
        """A new tree (the caller's: it may change it): ``start`` (or nothing) plus
        ``layers``. Without ``start`` each prefix of the chain is remembered, and the
        longest one already read (with contents kept, if ``keep``) is where reading starts."""
        if len(diff_ids) != len(layers):
            raise DeriveError(f"{ref}: its config lists {len(diff_ids)} diff_ids for {len(layers)} layers")
        digests = tuple(d.digest for d in layers)
        done, chain = 0, start is None
        if chain:
            for k in range(len(digests), 0, -1):
                hit = self._chains.get(digests[:k])
                if hit is not None and (hit[1] or not keep):
                    start, done = hit[0], k
                    break
        t = self.store.new(copy_of=start)
        for k in range(done, len(digests)):
            ops = self.ops(ref, layers[k], diff_ids[k], t, keep=keep)
            with self.store.batch():
                apply(t, ops)
            del ops
            settle_links(t)
            if chain:  # every prefix: siblings share their lower layers, proofs the common one
                self._chains[digests[:k + 1]] = (self.store.new(copy_of=t), keep)
        return t


def choose_common(lower: StoredTree, trees: Sequence[StoredTree], share: float) -> StoredTree:
    """The entries (path and everything compared) more than ``share`` of the group holds
    above ``lower``; each kept only where its parent is a directory below it or named
    by no layer (a common file never conjures a directory an image lacks), a hard link
    only with the file it names. Each entry's mtime is the one most of its holders have
    (the earliest image's, in group order, on a tie). Counted in SQL, streamed by path."""
    db, store = lower.db, lower.store
    ids = ",".join(str(t.t) for t in trees)
    cols = ", ".join(f"a.{c}" for c in _ENTRY_COLS)
    db.execute("DROP TABLE IF EXISTS cand")
    db.execute(f"CREATE TABLE cand AS SELECT a.path AS path, {cols}, COUNT(*) AS n, MIN(a.t) AS first "
               f"FROM e a LEFT JOIN e b ON b.t = {lower.t} AND b.path = a.path "
               f"WHERE a.t IN ({ids}) AND (b.path IS NULL OR NOT ({_SAME})) GROUP BY a.path, {cols}")
    db.execute("CREATE INDEX cand_path ON cand (path)")
    need = share * len(trees)
    common = store.new()

    def decide(path: str, rows: list[tuple]) -> None:
        by_key: dict[tuple, list[tuple]] = {}
        for r in rows:
            by_key.setdefault(r[:-3], []).append(r)  # the entry without mtime
        key, holders = max(by_key.items(), key=lambda kv: (sum(r[-2] for r in kv[1]), -min(r[-1] for r in kv[1])))
        if sum(r[-2] for r in holders) <= need:
            return
        parent = path.rpartition("/")[0]
        above = common.get(parent) or lower.get(parent)
        # a parent no layer names (tar's implicit directories) is no obstacle
        if parent and (above.type != "d" if above is not None else db.execute(
                "SELECT 1 FROM cand WHERE path = ?", (_key(parent),)).fetchone() is not None):
            return
        # exact wherever the group agrees; each image's other mtimes are counted by its proof
        best = max(holders, key=lambda r: (r[-2], -r[-1]))
        common[path] = _entry((*key, best[-3]))

    with store.batch():
        cur, rows = None, []
        for r in _stream(db, f"SELECT path, {', '.join(_ENTRY_COLS)}, n, first FROM cand ORDER BY path"):
            path = _path(r[0])
            if path != cur and rows:
                decide(cur, rows)
                rows = []
            cur = path
            rows.append(r[1:])
        if rows:
            decide(cur, rows)
        # a hard link goes in only with the file it names: one layer holds each inode
        for path, e in common.linked():
            if common.get(e.link) != replace(e, link=""):
                common.pop(path)
    db.execute("DROP TABLE cand")
    return common


def _stream(db, query: str, size: int = 4096):
    """Rows of ``query`` in batches: the cursor stays on ``cand``, writes go to ``e``."""
    cur = db.execute(query)
    while rows := cur.fetchmany(size):
        yield from rows


def common_tree_of(lower: StoredTree, common: StoredTree) -> StoredTree:
    """``lower`` with the common entries added (a non-directory over a lower directory
    replaces its subtree)."""
    db, t = lower.db, lower.store.new(copy_of=lower)
    with lower.store.batch():
        for (k,) in db.execute(f"SELECT c.path FROM e c JOIN e l ON l.t = {lower.t} AND l.path = c.path "
                               f"WHERE c.t = {common.t} AND c.type != 'd' AND l.type = 'd'").fetchall():
            t.drop_under(_path(k))
        db.execute(f"INSERT OR REPLACE INTO e SELECT {t.t}, path, {', '.join(_ENTRY_COLS)} FROM e "
                   f"WHERE t = {common.t}")
    return t


def own_items(common_tree: StoredTree, full: StoredTree) -> list[tuple[str, Entry | None]]:
    """What one image's own layer holds over ``common_tree`` (lower + common) to give
    ``full``: entries that differ or are new, whiteouts (topmost) for paths it lacks."""
    items: list[tuple[str, Entry | None]] = []
    for p, mine, _ in full.differing(common_tree):
        if mine is not None:
            items.append((p, mine))
            continue
        parent = p.rpartition("/")[0]
        if parent and parent in common_tree and parent not in full:
            continue  # the parent's whiteout hides it
        items.append((p, None))
    own = {p for p, e in items if e is not None}
    for group in link_groups(full).values():  # a group written at all is written whole, here
        if own.intersection(group):
            items += [(p, full[p]) for p in group if p not in own]
    return items


def relayered_config(base_config: dict[str, Any], lower: int, common: oci.Layer, own: oci.Layer,
                     group: str) -> dict[str, Any]:
    """The base config with its upper layers replaced by the common and own layers: the
    lower diff_ids and their history kept, upper history only where it made no layer."""
    cfg = json.loads(json.dumps(base_config))
    diff_ids = list((cfg.get("rootfs") or {}).get("diff_ids") or [])
    cfg["rootfs"] = {"type": "layers", "diff_ids": [*diff_ids[:lower], common.diff_id, own.diff_id]}
    history, seen, kept = list(cfg.get("history") or []), 0, []
    if sum(1 for h in history if not h.get("empty_layer")) == len(diff_ids):
        for h in history:
            if not h.get("empty_layer"):
                seen += 1
                if seen > lower:
                    continue
            kept.append(h)
    kept += [{"created": oci.EPOCH_ISO, "created_by": "imagefarm relayer: the group's common files",
              "comment": f"group {group}"},
             {"created": oci.EPOCH_ISO, "created_by": "imagefarm relayer: this image's own files",
              "comment": f"group {group}"}]
    cfg["history"] = kept
    return cfg


@dataclass(frozen=True)
class _Base:
    base: Reference       #: the dataset's name
    source: Reference     #: where its bytes are read (a mirror), pinned
    manifest: Manifest
    config: dict[str, Any]
    target: Reference

    @property
    def diff_ids(self) -> list[str]:
        return list((self.config.get("rootfs") or {}).get("diff_ids") or [])


class Relayer:
    """Re-layer groups of bases; shares the ``Appender``'s client and blob memory."""

    def __init__(self, appender: Appender, *, share: float = 0.5, work: Path | None = None) -> None:
        if not 0 <= share < 1:
            raise DeriveError(f"share {share} must be in [0, 1): a common file is held by more than that part")
        self.a, self.client, self.share = appender, appender.client, share
        self.work = Path(work or Path(appender.settings.state_dir) / "relayer")

    def relayer(self, bases: Sequence[Reference | str], payload: PayloadLike, *, to: Prefix | str | None = None,
                publish: bool = True) -> GroupResult:
        """Re-layer ``bases`` (one repository's images) with ``payload``; ``publish=False``
        pushes by digest only (the farm tags each image after its boot check)."""
        if not hasattr(payload, "env"):
            payload = AppendPayload.of(payload)
        s = self.a.settings
        to = s.prefix if to is None else to if isinstance(to, Prefix) else Prefix.parse(to)
        group = [self._base(parse(b) if isinstance(b, str) else b, payload, to) for b in bases]
        if not group:
            raise DeriveError("a re-layering group needs at least one base")
        order = sorted({g.manifest.digest: g for g in group}.values(), key=lambda g: g.manifest.digest)
        gid = group_id([g.manifest.digest for g in order], self.share)
        done = {g.manifest.digest: d for g in order
                if (d := self._existing(g, payload, gid)) is not None}
        if len(done) == len(order):
            return GroupResult(gid, tuple(self._result(g, done[g.manifest.digest], True, True, None)
                                          for g in group), ())
        state_subdir(self.work.parent, self.work.name)
        work = Path(tempfile.mkdtemp(dir=self.work, prefix="group-"))
        try:
            return self._relayer(group, order, gid, payload, to, work, publish)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # -- steps -------------------------------------------------------------------
    def _base(self, base: Reference, payload: PayloadLike, to: Prefix) -> _Base:
        source = mirrored(base, self.a.settings.mirrors)
        resolved = self.client.resolve(source, self.a.settings.platform, head_first=source.registry != to.registry)
        where = f"base {base}"
        surgery.check_base(resolved.manifest, where)
        pinned = source.with_digest(resolved.digest)
        try:
            config = json.loads(self.client.get_blob_bytes(pinned, resolved.manifest.config.digest))
        except ValueError:
            raise DeriveError(f"{where}: its config blob is not JSON") from None
        target = derived_reference(base, resolved.digest, payload.recipe_name, payload.recipe_digest,
                                   payload.agent_server_version, to)
        return _Base(base, pinned, resolved.manifest, config, target)

    def _existing(self, g: _Base, payload: PayloadLike, gid: str) -> str | None:
        digest = existing_derive(self.client, g.target, g.manifest.digest, payload.recipe_digest)
        if digest is None:
            return None
        got = self.client.get_manifest(g.target.with_digest(digest))
        return digest if got.annotations.get(oci.ANN_RELAYER_GROUP) == gid else None

    def _relayer(self, group: list[_Base], order: list[_Base], gid: str, payload: PayloadLike, to: Prefix,
                 work: Path, publish: bool) -> GroupResult:
        limits = limits_of(self.a.settings)
        spool = Spool(work / "spool", limits.spool_bytes)
        layers = Layers(self.client, spool, limits, TreeStore(work / "trees.sqlite"))
        try:
            return self._relayer_on(layers, spool, group, order, gid, payload, to, work, publish)
        finally:
            layers.store.close()

    def _relayer_on(self, layers: Layers, spool: Spool, group: list[_Base], order: list[_Base], gid: str,
                    payload: PayloadLike, to: Prefix, work: Path, publish: bool) -> GroupResult:
        lower = _shared_prefix([g.manifest.layers for g in order])
        first = order[0]
        lower_tree = layers.tree(first.source, first.manifest.layers[:lower], first.diff_ids[:lower])
        fulls = [layers.tree(g.source, g.manifest.layers[lower:], g.diff_ids[lower:], lower_tree, keep=True)
                 for g in order]
        common = choose_common(lower_tree, fulls, self.share)
        common_tree = common_tree_of(lower_tree, common)
        out = work / "layers"
        owns = {g.manifest.digest: own_items(common_tree, f) for g, f in zip(order, fulls)}
        common_tree.drop()
        # an image may keep a lower file the common layer replaces (or hard-link one): only
        # then are the lower layers read again, to keep those contents too
        need = {e.digest for items in owns.values() for _, e in items if e is not None and e.type == "f"}
        if any(not spool.path(d).exists() for d in need):
            layers.tree(first.source, first.manifest.layers[:lower], first.diff_ids[:lower], keep=True).drop()
        common_layer = write_layer(common.items(), out, spool, presorted=True)
        common.drop()
        own = {d: write_layer(items, out, spool) for d, items in owns.items()}
        del owns
        bases_tree = {g.manifest.digest: f for g, f in zip(order, fulls)}
        results, proofs = [], []
        for g in group:  # in the order asked (two tags of one digest are two images)
            with self.client.track() as st:
                digest = self._put(g, lower, common_layer, own[g.manifest.digest], payload, to, gid)
                proofs.append(self._prove(layers, g, digest, bases_tree[g.manifest.digest], payload))
            results.append(self._result(g, digest, False, publish, st))
        if publish:  # last, once every image of the group is in and proven: a crash leaves no tag
            for g, r in zip(group, results):
                self.a.publish(g.target, r.digest)
        return GroupResult(gid, tuple(results), tuple(proofs), lower, common_layer,
                           tuple(own[g.manifest.digest] for g in group), layers.bytes_read)

    def _put(self, g: _Base, lower: int, common: oci.Layer, own: oci.Layer, payload: PayloadLike, to: Prefix,
             gid: str) -> str:
        """Blobs first (content addressed: what the registry has is skipped), then the
        manifest by digest; the tag is put by the caller once the image is proven."""
        where = f"base {g.base}"
        cfg = relayered_config(g.config, lower, common, own, gid)
        layers = (*g.manifest.layers[:lower], common.descriptor, own.descriptor)
        staged = replace(g.manifest, layers=layers)
        ann = {**surgery.annotations(g.base, g.manifest.digest, payload, g.source),
               oci.ANN_RELAYER_GROUP: gid, oci.ANN_RELAYER_COMMON: common.digest}
        config = surgery.derived_config(cfg, staged, payload, ann, platform=self.a.settings.platform, where=where)
        manifest = surgery.derived_manifest(staged, config, payload, ann)
        target, scopes = g.target, self.a._scopes(g.source, g.target)
        for d in g.manifest.layers[:lower]:
            self.a.blobs.ensure(target, d, source=g.source, scopes=scopes)
        for layer in (common, own):
            self.a.blobs.ensure(target, layer.descriptor, local=layer.path, scopes=scopes)
        self.a.blobs.ensure(target, payload.layer.descriptor, local=payload.layer.path, home=payload_home(to),
                            source=getattr(payload, "source", None), scopes=scopes)
        self.client.upload_blob(target, oci.sha256_digest(config), config, scopes=scopes)
        digest = self.client.put_manifest(target.with_digest(oci.sha256_digest(manifest)), manifest,
                                          oci.OCI_MANIFEST, scopes=scopes)
        provenance.publish(self.client, target, digest, len(manifest), base=g.base, base_digest=g.manifest.digest,
                           how="relayer", recipe=payload.recipe_name, recipe_digest=payload.recipe_digest,
                           agent_server_version=payload.agent_server_version, payload=payload.layer)
        return digest

    def _prove(self, layers: Layers, g: _Base, digest: str, base_tree: Tree, payload: PayloadLike) -> Proof:
        pl = payload.layer
        want = layers.store.new(copy_of=base_tree)
        with layers.store.batch():
            apply(want, layers.ops(g.target, pl.descriptor, pl.diff_id, want, cache=True))
        return prove_tree(layers, g.target.with_digest(digest), settle_links(want))

    def _result(self, g: _Base, digest: str, skipped: bool, published: bool, st) -> DeriveResult:
        return DeriveResult(base=str(g.base), base_digest=g.manifest.digest, image=str(g.target), digest=digest,
                            skipped=skipped, blobs_uploaded=st.blobs_uploaded if st else 0,
                            bytes_moved=st.blob_bytes_uploaded if st else 0, requests=st.requests if st else 0,
                            kind="relayer", published=published)


def limits_of(settings: Settings) -> Limits:
    """What reading one untrusted base layer may cost, from the ``IMAGEFARM_RELAYER_*`` settings."""
    return Limits(header_bytes=settings.relayer_max_header_bytes, entries=settings.relayer_max_entries,
                  unpacked_bytes=settings.relayer_max_unpacked_bytes, ratio=settings.relayer_max_ratio,
                  spool_bytes=settings.relayer_max_spool_bytes)


def _shared_prefix(layer_lists: Sequence[Sequence[oci.Descriptor]]) -> int:
    """How many lower layers every image holds identically (by digest), in order; at
    least one layer of each image stays above it (the files to re-layer)."""
    n = min(len(ls) for ls in layer_lists) - 1
    k = 0
    while k < n and len({ls[k].digest for ls in layer_lists}) == 1:
        k += 1
    return k


def prove_tree(layers: Layers, derived: Reference, want: Tree) -> Proof:
    """Read ``derived`` (pinned) from its registry and compare its tree with ``want``:
    a ``DeriveError`` names the first path that differs."""
    client = layers.client
    m = client.get_manifest(derived)
    if not isinstance(m, Manifest):
        raise DeriveError(f"{derived}: is an index, not an image")
    cfg = json.loads(client.get_blob_bytes(derived, m.config.digest))
    ids = (cfg.get("rootfs") or {}).get("diff_ids") or [None] * len(m.layers)
    if len(ids) != len(m.layers):
        raise DeriveError(f"{derived}: its config lists {len(ids)} diff_ids for {len(m.layers)} layers")
    # all but the top two layers (own + payload) as one remembered chain: a group's
    # images share it, so its common layer is read back once, not once per image
    head = layers.tree(derived, m.layers[:-2], ids[:-2])
    got = layers.tree(derived, m.layers[-2:], ids[-2:], head)
    head.drop()
    try:
        path = first_difference(want, got)
        if path is not None:
            w, h = want.get(path), got.get(path)
            raise DeriveError(f"{derived}: re-layered tree differs from its base plus the payload at /{path}: "
                              f"base has {w.describe() if w else 'nothing'}, derived has "
                              f"{h.describe() if h else 'nothing'}")
        return Proof(str(derived), len(want), want.mtimes_differ(got))
    finally:
        got.drop()
        want.drop()


def prove(client: RegistryClient, base: Reference, derived: Reference, work: Path,
          layers: Layers | None = None) -> Proof:
    """Stand-alone proof: ``derived`` (pinned) against ``base`` (pinned) plus the payload
    layer the derived image records, every layer streamed from the registry (once per
    digest for the ``layers`` cache given: pass one to prove a group's images)."""
    m = client.get_manifest(derived)
    b = client.get_manifest(base)
    if not isinstance(m, Manifest) or not isinstance(b, Manifest):
        raise DeriveError(f"{base} / {derived}: prove takes image manifests, not indexes")
    payload = m.annotations.get(oci.ANN_PAYLOAD_DIGEST)
    if not payload or m.layers[-1].digest != payload:
        raise DeriveError(f"{derived}: its last layer is not the payload it records")
    bcfg = json.loads(client.get_blob_bytes(base, b.config.digest))
    dcfg = json.loads(client.get_blob_bytes(derived, m.config.digest))
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        layers = layers or Layers(client, Spool(Path(tmp)))
        want = layers.tree(base, b.layers, (bcfg.get("rootfs") or {}).get("diff_ids") or [])
        with layers.store.batch():
            apply(want, layers.ops(derived, m.layers[-1], dcfg["rootfs"]["diff_ids"][-1], want, cache=True))
        return prove_tree(layers, derived, settle_links(want))
