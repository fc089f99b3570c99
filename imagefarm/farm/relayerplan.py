"""``prebuild --plan --relayer``: what re-layering each repository's group would store
and what a node would pull for each further sibling, before anything is written.

How it estimates, per group (the groups ``prebuild --relayer`` forms):

- from the manifests, exactly: the lower layers every base holds by digest (stored
  once either way, pulled once per node), each base's upper layers (what a plain derive
  stores of its own and a node pulls per sibling), and the config sizes;
- from file listings, an estimate: the upper layers of two bases (the group's first and
  its middle one) are streamed once and every file hashed. Files both hold alike (path,
  type, mode, owner, content or link target; mtimes are not compared) are what the
  common layer holds; what one holds and the other does not (plus 512 header bytes an
  entry) is what each sibling's own layer holds, compressed by the ratio its own
  layers show (blob bytes / tar bytes). Stored = lower + common + one own layer per
  base; a node holding a sibling pulls one own layer and one config.

Two bases are read, not all: the plan costs two images' layers per group, the run
reads every layer. A group whose upper layers are one blob for all needs no listing.
"""

from __future__ import annotations

import gzip
import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

from imagefarm import oci
from imagefarm.errors import ImagefarmError
from imagefarm.names.reference import parse
from imagefarm.registry import RegistryClient

#: what one tar entry costs beyond its content (its header)
HEADER = 512


@dataclass
class GroupPlan:
    repository: str
    bases: int
    lower_layers: int = 0
    lower_bytes: int = 0            #: the layers all bases share, by digest (stored once either way)
    plain_own_bytes: int = 0        #: every base's upper blobs (distinct), what plain derives store
    relayer_own_bytes: int = 0      #: estimate: common + one own layer per base
    common_bytes: int = 0           #: estimate, compressed
    own_bytes: int = 0              #: estimate, compressed, per base
    plain_pull_bytes: int = 0       #: per further sibling on a node: its upper layers + config (mean)
    relayer_pull_bytes: int = 0     #: per further sibling: its own layer + config (estimate)
    read_bytes: int = 0             #: what the run reads: every distinct layer once
    listed: list[str] = field(default_factory=list)  #: the bases whose layers were listed
    how: str = "listing"            #: listing, manifests (one upper blob for all) or a reason it could not
    plan_read_bytes: int = 0        #: what this plan read to list them

    @property
    def ratio(self) -> float | None:
        return self.plain_own_bytes / self.relayer_own_bytes if self.relayer_own_bytes else None


@dataclass(frozen=True)
class Listing:
    """A base's upper layers as files (whiteouts applied), and their sizes."""

    files: dict[str, tuple]         #: path -> (type, mode, uid, gid, size, sha256 or link target)
    tar_bytes: int
    blob_bytes: int


def plan_groups(client: RegistryClient, resolved: dict[str, Any], *, workers: int = 8,
                log: Callable[[str], None] = lambda m: None) -> list[GroupPlan]:
    """One ``GroupPlan`` per re-layering group of the bases in ``resolved`` (base name ->
    the plan's resolved manifest), repositories of one base left out (they take the plain path)."""
    from .selection import relayer_groups

    groups = [g for g in relayer_groups(list(resolved)) if len(g) > 1]
    with ThreadPoolExecutor(max(1, min(workers, len(groups) or 1))) as pool:
        return list(pool.map(lambda g: _group(client, g, [resolved[b] for b in g], log), groups))


def _group(client: RegistryClient, bases: list[str], res: list[Any], log) -> GroupPlan:
    ref0 = parse(bases[0])
    gp = GroupPlan(f"{ref0.registry}/{ref0.repository}", len(bases))
    layer_lists = [r.manifest.layers for r in res]
    lower = shared_prefix(layer_lists)
    gp.lower_layers = lower
    gp.lower_bytes = sum(d.size for d in layer_lists[0][:lower])
    uppers = {d.digest: d.size for ls in layer_lists for d in ls[lower:]}
    gp.plain_own_bytes = sum(uppers.values())
    gp.read_bytes = gp.lower_bytes + gp.plain_own_bytes
    configs = [r.manifest.config.size for r in res]
    gp.plain_pull_bytes = round(sum(sum(d.size for d in ls[lower:]) + c
                                    for ls, c in zip(layer_lists[1:], configs[1:])) / (len(res) - 1))
    if len({tuple(d.digest for d in ls[lower:]) for ls in layer_lists}) == 1:
        gp.how, gp.common_bytes, gp.own_bytes = "manifests", gp.plain_own_bytes, 0
    else:
        a, b = 0, len(bases) // 2
        try:
            la, lb = (listing(client, parse(bases[i]).with_digest(res[i].digest), layer_lists[i][lower:])
                      for i in (a, b))
        except (ImagefarmError, OSError, EOFError, ValueError) as exc:
            gp.how = f"no listing ({exc}); counted as plain"
            gp.relayer_own_bytes, gp.relayer_pull_bytes = gp.plain_own_bytes, gp.plain_pull_bytes
            return gp
        gp.listed = [bases[a], bases[b]]
        gp.plan_read_bytes = la.blob_bytes + lb.blob_bytes
        ratio = (la.blob_bytes + lb.blob_bytes) / max(1, la.tar_bytes + lb.tar_bytes)
        shared = sum(_entry_bytes(v) for p, v in la.files.items() if lb.files.get(p) == v)
        own = (sum(_entry_bytes(v) for p, v in lb.files.items() if la.files.get(p) != v)
               + sum(_entry_bytes(v) for p, v in la.files.items() if lb.files.get(p) != v)) / 2
        gp.common_bytes = round(shared * ratio)
        gp.own_bytes = round(own * ratio)
    gp.relayer_own_bytes = gp.common_bytes + gp.own_bytes * len(bases)
    gp.relayer_pull_bytes = gp.own_bytes + round(sum(configs[1:]) / (len(res) - 1))
    log(f"plan: {gp.repository}: {len(bases)} bases, re-layered own bytes about {gp.relayer_own_bytes:,} "
        f"of {gp.plain_own_bytes:,}")
    return gp


def shared_prefix(layer_lists: Sequence[Sequence[oci.Descriptor]]) -> int:
    """How many lower layers every base holds by digest, in order; at least one layer
    each stays above (the rule ``derive.relayer`` re-layers by)."""
    n = min(len(ls) for ls in layer_lists) - 1
    k = 0
    while k < n and len({ls[k].digest for ls in layer_lists}) == 1:
        k += 1
    return k


def _entry_bytes(v: tuple) -> int:
    size = v[4] if v[0] == "f" else 0
    return HEADER + -(-size // 512) * 512


def listing(client: RegistryClient, ref, layers: Sequence[oci.Descriptor]) -> Listing:
    """The files the layers give, in order (whiteouts applied), each regular file hashed."""
    import tarfile

    files: dict[str, tuple] = {}
    tar_bytes = blob_bytes = 0
    for d in layers:
        with client.open_blob(ref, d.digest) as chunks:
            counted = _Counting(chunks)
            raw = _decompressed(counted, d.media_type)
            sized = _Counting(iter(lambda: raw.read(1 << 20), b""))
            with tarfile.open(fileobj=io.BufferedReader(sized, 1 << 20), mode="r|") as tf:
                for m in tf:
                    path = m.name.lstrip("./").rstrip("/") if m.name not in (".", "./") else ""
                    if not path:
                        continue
                    head, _, leaf = path.rpartition("/")
                    if leaf == ".wh..wh..opq":
                        for p in [p for p in files if p.startswith(head + "/")]:
                            del files[p]
                        continue
                    if leaf.startswith(".wh."):
                        gone = f"{head}/{leaf[4:]}" if head else leaf[4:]
                        for p in [p for p in files if p == gone or p.startswith(gone + "/")]:
                            del files[p]
                        continue
                    if m.isreg():
                        h = hashlib.sha256()
                        fh = tf.extractfile(m)
                        for block in iter(lambda: fh.read(1 << 20), b""):
                            h.update(block)
                        what = h.hexdigest()
                    else:
                        what = m.linkname
                    kind = "f" if m.isreg() else "d" if m.isdir() else "l" if m.issym() else \
                        "h" if m.islnk() else "o"
                    files[path] = (kind, m.mode & 0o7777, m.uid, m.gid, m.size if m.isreg() else 0, what)
            sized.drain()
        tar_bytes += sized.n
        blob_bytes += counted.n
    return Listing(files, tar_bytes, blob_bytes)


class _Counting(io.RawIOBase):
    """A readable stream over chunks that counts the bytes that passed."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it: Iterator[bytes] = iter(chunks)
        self._buf = b""
        self.n = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        k = min(len(b), len(self._buf))
        b[:k], self._buf = self._buf[:k], self._buf[k:]
        self.n += k
        return k

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _decompressed(raw: io.RawIOBase, media_type: str):
    if media_type.endswith("zstd"):
        try:
            import zstandard
        except ImportError:
            raise ValueError("a zstd layer (install `zstandard` to list it)") from None
        return zstandard.ZstdDecompressor().stream_reader(io.BufferedReader(raw, 1 << 20))
    if media_type.endswith(("gzip", "gzip+encrypted")) or media_type.endswith("diff.tar.gzip"):
        return gzip.GzipFile(fileobj=io.BufferedReader(raw, 1 << 20))
    return io.BufferedReader(raw, 1 << 20)


def size(n: float) -> str:
    from .plan import size as fmt

    return fmt(n)


def render_groups(groups: list[GroupPlan]) -> list[str]:
    out = [f"  re-layering: {len(groups)} group(s) of one repository each (a repository of one base: plain path)"]
    for g in groups:
        ratio = f"{g.ratio:.1f}x" if g.ratio else "-"
        out.append(f"  {g.repository}: {g.bases} bases; lower {g.lower_layers} layers {size(g.lower_bytes)} "
                   f"(shared, stored once either way); own bytes stored {size(g.plain_own_bytes)} plain vs "
                   f"~{size(g.relayer_own_bytes)} re-layered ({ratio}); per further sibling a node pulls "
                   f"{size(g.plain_pull_bytes)} plain vs ~{size(g.relayer_pull_bytes)}; the run reads "
                   f"{size(g.read_bytes)} [{g.how}]")
    if groups:
        plain = sum(g.plain_own_bytes for g in groups)
        rel = sum(g.relayer_own_bytes for g in groups)
        out.append(f"  re-layering total: own bytes {size(plain)} plain vs ~{size(rel)} re-layered"
                   + (f" ({plain / rel:.1f}x)" if rel else ""))
    return out
