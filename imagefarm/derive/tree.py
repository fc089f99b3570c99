"""Root filesystem trees read from layer blobs as they stream, and written back.

A layer is read once, in stream mode (tar over gzip or zstd over the registry's chunks:
no layer is ever whole in memory or on disk), both its digest and diff_id checked while
reading, each file's content hashed and, for layers whose files may be written again,
kept once per content digest in a ``Spool`` on disk. Applying layers in order, each in
stream order as container engines unpack them (whiteouts, opaque directories), gives the
merged tree an image's container sees; trees live on disk (``TreeStore``: SQLite rows),
so memory does not grow with an image's size.

Base layers are untrusted. Member names are cleaned as engines clean them (``a//b``,
``a/./b`` and ``a/x/../b`` are ``a/b``); refused, as a ``DeriveError`` naming the layer:
a name that is absolute or climbs out of the root, two entries (or a whiteout and an
entry) for one path in one layer, an entry under a non-directory. ``Limits`` bound what
reading one costs (header size, entries, unpacked bytes absolute and as a ratio to the
compressed size, spool bytes), and a blob stream stops at its descriptor's size.

What two trees must agree on is ``Entry`` equality, by meaning rather than raw header
fields: type, permission bits (Go's archive/tar, which Docker, BuildKit, buildah and
podman use, also writes the type bits into the mode field), owner, content digest, link
target, hard-link group, device numbers and xattrs. The mtime is carried (and written
back) but not compared: git stamps every checkout, pip every install, with the time they
ran, so consecutive commits of one repository would share no file at all if it were.
Hard links stay hard links when both paths come from one layer (each group written
whole, in one layer); a link to a lower layer's file is a copy, as an engine unpacking
that layer on its own makes it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import sqlite3
import tarfile
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from imagefarm import oci
from imagefarm.errors import DeriveError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_TYPES = {tarfile.REGTYPE: "f", tarfile.AREGTYPE: "f", tarfile.CONTTYPE: "f", tarfile.DIRTYPE: "d",
          tarfile.SYMTYPE: "l", tarfile.CHRTYPE: "c", tarfile.BLKTYPE: "b", tarfile.FIFOTYPE: "p"}
_TAR_TYPES = {"f": tarfile.REGTYPE, "d": tarfile.DIRTYPE, "l": tarfile.SYMTYPE, "c": tarfile.CHRTYPE,
              "b": tarfile.BLKTYPE, "p": tarfile.FIFOTYPE}
_GZIP = (oci.OCI_LAYER_GZIP, oci.DOCKER_LAYER_GZIP)
_TAR = (oci.OCI_LAYER_TAR, "application/vnd.docker.image.rootfs.diff.tar")
CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Entry:
    """One path of a tree. Equality is what a tree comparison checks (not the mtime)."""

    type: str                     #: f file, d dir, l symlink, c/b device, p fifo
    mode: int
    uid: int
    gid: int
    digest: str = ""              #: sha256 of a file's content
    size: int = 0
    link: str = ""                #: a symlink's target; for a file, the path it is hard-linked to
    dev: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[str, str], ...] = ()
    mtime: float = field(default=0, compare=False)

    def describe(self) -> str:
        what = {"f": f"file {self.digest[:19]} ({self.size} B)" + (f" hard-linked to /{self.link}" if self.link
                                                                    else ""), "d": "directory", "l": f"symlink -> {self.link}",
                "c": f"char device {self.dev}", "b": f"block device {self.dev}", "p": "fifo"}[self.type]
        extra = f" xattrs {dict(self.xattrs)}" if self.xattrs else ""
        return f"{what} mode {self.mode:o} owner {self.uid}:{self.gid}{extra}"


Tree = dict[str, Entry]
#: one layer as data: ("add", path, entry), ("wh", path, None), ("opq", dir, None)
Op = tuple[str, str, Entry | None]


class Spool:
    """File contents on disk, one copy per content digest (what re-layering writes back);
    past ``limit`` bytes in use, the write in progress stops with ``Refused``."""

    def __init__(self, root: Path, limit: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.limit, self.used = limit, 0

    def path(self, digest: str) -> Path:
        return self.root / digest.split(":", 1)[1]

    def _count(self, n: int) -> None:
        if self.limit is not None and self.used + n > self.limit:
            raise Refused(f"the group's spool holds more than {self.limit} bytes "
                          "(IMAGEFARM_RELAYER_MAX_SPOOL_BYTES)")
        self.used += n

    def put(self, fh: io.BufferedIOBase | None) -> tuple[str, int]:
        """Hash ``fh`` to its end while keeping it here once; (digest, size). A small
        file is hashed in memory first (most are kept already: siblings share them)."""
        head = fh.read(CHUNK) if fh is not None else b""
        if len(head) < CHUNK:
            digest = "sha256:" + hashlib.sha256(head).hexdigest()
            if not self.path(digest).exists():
                self._count(len(head))
                self._keep(digest, [head])
            return digest, len(head)
        h, n = hashlib.sha256(head), len(head)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".in-")
        counted = 0
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(head)
                self._count(len(head))
                counted = len(head)
                while chunk := fh.read(CHUNK):
                    h.update(chunk)
                    n += len(chunk)
                    self._count(len(chunk))
                    counted += len(chunk)
                    out.write(chunk)
            digest = "sha256:" + h.hexdigest()
            if self.path(digest).exists():
                self.used -= counted  # kept already: this copy goes
            os.replace(tmp, self.path(digest))
            return digest, n
        except BaseException:
            self.used -= counted
            raise
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _keep(self, digest: str, chunks: list[bytes]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".in-")
        with os.fdopen(fd, "wb") as out:
            for c in chunks:
                out.write(c)
        os.replace(tmp, self.path(digest))


def _hash_only(fh: io.BufferedIOBase | None) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    while fh is not None and (chunk := fh.read(CHUNK)):
        h.update(chunk)
        n += len(chunk)
    return "sha256:" + h.hexdigest(), n


class Refused(Exception):
    """A layer meets a limit or holds what no tree may (internal: ``read_ops`` turns it
    into a ``DeriveError`` naming the layer; raised from inside gzip and tarfile reads,
    so it must not be an ``OSError`` they would swallow or rewrap)."""


class _Chunks(io.RawIOBase):
    """A readable file over an iterator of byte chunks, hashing what passes through;
    past ``limit`` bytes it stops with ``Refused(what)``."""

    def __init__(self, chunks: Iterable[bytes], limit: int | None = None, what: str = "") -> None:
        self._it, self._buf = iter(chunks), memoryview(b"")
        self.hash, self.size = hashlib.sha256(), 0
        self.limit, self.what = limit, what

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        while not self._buf:
            try:
                chunk = next(self._it)
            except StopIteration:
                return 0
            self.hash.update(chunk)
            self.size += len(chunk)
            if self.limit is not None and self.size > self.limit:
                raise Refused(self.what)
            self._buf = memoryview(chunk)
        n = min(len(b), len(self._buf))
        b[:n], self._buf = self._buf[:n], self._buf[n:]
        return n

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def norm(name: str) -> str:
    """A tar member name as a tree path, the way container engines clean it: ``a//b``,
    ``a/./b`` and ``a/x/../b`` are all ``a/b``; a leading ``./`` and a trailing ``/`` go.
    ``Refused``: an absolute name, or one whose ``..`` climbs out of the root."""
    if name.startswith("/"):
        raise Refused(f"absolute path {name!r}")
    parts: list[str] = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not parts:
                raise Refused(f"path {name!r} climbs out of the root with '..'")
            parts.pop()
        else:
            parts.append(p)
    return "/".join(parts)


def _ancestors(path: str) -> Iterator[str]:
    while "/" in path:
        path = path.rpartition("/")[0]
        yield path


class _Layer:
    """What one layer has said so far, to check each new member against it and ``below``:
    one entry per path, no whiteout and add of one path, no entry under a non-directory."""

    def __init__(self, below: Mapping[str, Entry]) -> None:
        self.below = below
        self.added: dict[str, Entry] = {}
        self.said: dict[str, str] = {}     # path -> "add" / "wh": what this layer said of it
        self.whiteouts: set[str] = set()
        self.opaque: set[str] = set()

    def _hidden(self, path: str) -> bool:
        """A lower entry this layer's whiteouts or opaque markers have hidden."""
        return path in self.whiteouts or any(a in self.whiteouts or a in self.opaque for a in _ancestors(path))

    def lookup(self, path: str) -> Entry | None:
        e = self.added.get(path)
        if e is not None or path in self.said:
            return e
        return None if self._hidden(path) else self.below.get(path)

    def say(self, op: str, path: str, raw: str) -> None:
        if op != "opq":
            if path in self.said:
                what = ("a whiteout and an entry" if {op, self.said[path]} == {"add", "wh"}
                        else "two entries" if op == "add" else "two whiteouts")
                raise Refused(f"{what} for /{path} (member {raw!r})")
            self.said[path] = op
        for a in _ancestors(path if op != "opq" else path + "/x"):
            e = self.lookup(a)
            if e is not None:
                if e.type != "d":
                    raise Refused(f"member {raw!r} is under /{a}, a {e.describe()}, not a directory")
                break
        if op == "wh":
            self.whiteouts.add(path)
        elif op == "opq":
            self.opaque.add(path)


@dataclass(frozen=True, slots=True)
class Limits:
    """What one untrusted layer may cost to read (each an ``IMAGEFARM_RELAYER_*`` setting)."""

    header_bytes: int = 1 << 20          #: one PAX or GNU long-name header, read into memory
    entries: int = 2_000_000             #: tar members in one layer
    unpacked_bytes: int = 32 << 30       #: the tar stream of one layer, uncompressed
    ratio: float = 50.0                  #: unpacked / compressed size, once past ``ratio_floor``
    ratio_floor: int = 64 << 20          #: small layers of tiny files compress far better than 50x
    spool_bytes: int = 32 << 30          #: file contents a group keeps on disk at once

    def unpacked(self, compressed: int) -> int:
        return min(self.unpacked_bytes, max(self.ratio_floor, int(self.ratio * compressed)))


def _tarinfo(limits: Limits) -> type[tarfile.TarInfo]:
    """tarfile reads a PAX or GNU long-name header's body into memory whole: check its
    size first (stream mode reads members only through these hooks)."""

    class Info(tarfile.TarInfo):
        def _check(self) -> None:
            if self.size > limits.header_bytes:
                raise Refused(f"a {self.size}-byte tar header (limit {limits.header_bytes}: "
                              "IMAGEFARM_RELAYER_MAX_HEADER_BYTES)")

        def _proc_pax(self, tarfile):  # type: ignore[no-untyped-def]
            self._check()
            return super()._proc_pax(tarfile)

        def _proc_gnulong(self, tarfile):  # type: ignore[no-untyped-def]
            self._check()
            return super()._proc_gnulong(tarfile)

    return Info


def _decompressed(media_type: str, raw: io.BufferedReader) -> io.RawIOBase | io.BufferedIOBase:
    if media_type in _GZIP:
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if media_type == oci.OCI_LAYER_ZSTD:
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw


def _zstd_errors() -> tuple[type[Exception], ...]:
    import zstandard

    return (zstandard.ZstdError,)


def read_ops(chunks: Iterable[bytes], desc: oci.Descriptor, diff_id: str | None, *, below: Mapping[str, Entry],
             spool: Spool | None, where: str, limits: Limits = Limits()) -> list[Op]:
    """One layer blob, streamed, as ops in stream order; its digest and diff_id are
    checked at the end. ``below`` (the tree under this layer) resolves hard links to
    lower files and finds entries under a non-directory; ``spool`` keeps contents.
    A layer that meets ``limits`` or holds a path no tree may is a ``DeriveError``
    saying which (the read stops there: nothing more is inflated or spooled)."""
    if desc.media_type not in (*_GZIP, *_TAR, oci.OCI_LAYER_ZSTD):
        raise DeriveError(f"{where}: layer {desc.digest[:19]} is {desc.media_type}; re-layering reads "
                          "tar, tar+gzip and tar+zstd layers")
    what = f"{where}: layer {desc.digest[:19]}"
    raw = _Chunks(chunks, desc.size, f"the registry sent more than its descriptor's {desc.size} bytes")
    stream = _decompressed(desc.media_type, io.BufferedReader(raw, CHUNK))
    cap = limits.unpacked(desc.size)
    inner = _Chunks(iter(lambda: stream.read(CHUNK), b""), cap,
                    f"it unpacks to more than {cap} bytes ({desc.size} compressed; limits: "
                    f"IMAGEFARM_RELAYER_MAX_UNPACKED_BYTES={limits.unpacked_bytes}, "
                    f"IMAGEFARM_RELAYER_MAX_RATIO={limits.ratio:g})")
    ops: list[Op] = []
    layer = _Layer(below)
    keep = spool.put if spool is not None else _hash_only
    try:
        with tarfile.open(fileobj=io.BufferedReader(inner, CHUNK), mode="r|",
                          tarinfo=_tarinfo(limits)) as tar:  # (a larger bufsize is slower: it copies its buffer)
            n = 0
            while (m := tar.next()) is not None:
                tar.members.clear()  # stream mode would keep every member's header
                n += 1
                if n > limits.entries:
                    raise Refused(f"more than {limits.entries} entries (IMAGEFARM_RELAYER_MAX_ENTRIES)")
                path = norm(m.name)
                if not path:
                    continue
                parent, _, base = path.rpartition("/")
                if base == OPAQUE:
                    layer.say("opq", parent, m.name)
                    ops.append(("opq", parent, None))
                    continue
                if base.startswith(WHITEOUT):
                    hidden = "/".join(x for x in (parent, base[len(WHITEOUT):]) if x)
                    layer.say("wh", hidden, m.name)
                    ops.append(("wh", hidden, None))
                    continue
                layer.say("add", path, m.name)
                xattrs = tuple(sorted((k, v) for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")))
                # Go's archive/tar (Docker, BuildKit, buildah, podman) keeps the file-type
                # bits in the mode field; Python's drops them: the meaning is the low bits
                common = dict(mode=m.mode & 0o7777, uid=m.uid, gid=m.gid, xattrs=xattrs, mtime=m.mtime)
                if m.islnk():
                    name = norm(m.linkname)
                    target = layer.lookup(name)
                    if target is None or target.type != "f":
                        raise DeriveError(f"{where}: hard link /{path} names /{name}, "
                                          "which is no file of this image")
                    # one inode: the target's metadata; a link to a lower layer's file is
                    # a copy (an engine unpacks a layer on its own: it cannot link across)
                    e = replace(target, link=(target.link or name) if name in layer.added else "")
                elif m.isreg():
                    digest, size = keep(tar.extractfile(m))
                    e = Entry("f", digest=digest, size=size, **common)
                elif m.type in _TYPES:
                    e = Entry(_TYPES[m.type], link=m.linkname if m.issym() else "",
                              dev=(m.devmajor, m.devminor) if m.ischr() or m.isblk() else (0, 0), **common)
                else:
                    raise DeriveError(f"{where}: /{path} is a tar member of type {m.type!r}")
                layer.added[path] = e
                ops.append(("add", path, e))
        inner.drain()
        raw.drain()
    except Refused as exc:
        raise DeriveError(f"{what} refused: {exc}") from None
    except (tarfile.TarError, OSError, EOFError, ValueError, *_zstd_errors()) as exc:
        raise DeriveError(f"{what} is no readable tar stream: {exc}") from None
    if "sha256:" + raw.hash.hexdigest() != desc.digest:
        raise DeriveError(f"{where}: layer {desc.digest[:19]} read back with another digest")
    if diff_id and "sha256:" + inner.hash.hexdigest() != diff_id:
        raise DeriveError(f"{where}: layer {desc.digest[:19]} does not match its diff_id {diff_id[:19]}")
    return ops


def _drop_under(tree: Tree, path: str, keep: set[str] | None = None) -> None:
    if isinstance(tree, StoredTree):
        return tree.drop_under(path, keep)
    prefix = path + "/" if path else ""
    for p in [p for p in tree if p.startswith(prefix) and (keep is None or p not in keep)]:
        del tree[p]


def apply(tree: Tree, ops: Iterable[Op]) -> Tree:
    """Apply one layer's ops to ``tree`` in place, in stream order as container engines
    unpack a layer: a whiteout removes the path (and what is under it) as it stands at
    that point; an opaque marker hides what lower layers put under its directory (this
    layer's own entries stay, before or after it); a non-directory over a directory
    replaces the whole subtree."""
    mine: set[str] = set()
    for op, path, e in ops:
        if op == "opq":
            _drop_under(tree, path, mine)
        elif op == "wh":
            tree.pop(path, None)
            _drop_under(tree, path)
        else:
            old = tree.get(path)
            if old is not None and old.type == "d" and e.type != "d":
                _drop_under(tree, path)
            tree[path] = e
            mine.add(path)
    return tree


_KEY = ("type", "mode", "uid", "gid", "digest", "size", "link", "dmaj", "dmin", "xattrs")  # what Entry compares
_ENTRY_COLS = (*_KEY, "mtime")
_COLS = ", ".join(_ENTRY_COLS)
_SAME = " AND ".join(f"a.{c} IS b.{c}" for c in _KEY)


def _row(e: Entry) -> tuple:
    return (e.type, e.mode, e.uid, e.gid, e.digest, e.size, e.link, e.dev[0], e.dev[1],
            json.dumps(e.xattrs) if e.xattrs else "", e.mtime)


def _entry(r: Sequence) -> Entry:
    return Entry(r[0], r[1], r[2], r[3], r[4], r[5], r[6], (r[7], r[8]),
                 tuple(tuple(x) for x in json.loads(r[9])) if r[9] else (), r[10])


def _key(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def _path(key: bytes) -> str:
    return key.decode("utf-8", "surrogateescape")


class TreeStore:
    """Trees on disk: one SQLite file holds a group's trees as rows (tree, path, entry),
    so what re-layering holds in memory does not grow with its images' sizes or number
    (SQLite's page cache is capped). Paths are byte strings: their order is tar's."""

    def __init__(self, path: Path, cache_mib: int = 64) -> None:
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{cache_mib * 1024}", "temp_store=FILE"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute(f"CREATE TABLE IF NOT EXISTS e (t INTEGER, path BLOB, {_COLS}, PRIMARY KEY (t, path)) "
                        "WITHOUT ROWID")
        self._next = 0

    def new(self, copy_of: "StoredTree | None" = None) -> "StoredTree":
        self._next += 1
        t = StoredTree(self, self._next)
        if copy_of is not None:
            self.db.execute(f"INSERT INTO e SELECT ?, path, {_COLS} FROM e WHERE t = ?", (t.t, copy_of.t))
        return t

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Many writes as one transaction (one commit, not one per row)."""
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()


class StoredTree:
    """One tree of a ``TreeStore``: the mapping ``apply`` and the checks use, on disk."""

    def __init__(self, store: TreeStore, t: int) -> None:
        self.store, self.db, self.t = store, store.db, t

    def get(self, path: str, default: Entry | None = None) -> Entry | None:
        r = self.db.execute(f"SELECT {_COLS} FROM e WHERE t = ? AND path = ?", (self.t, _key(path))).fetchone()
        return _entry(r) if r else default

    def __getitem__(self, path: str) -> Entry:
        e = self.get(path)
        if e is None:
            raise KeyError(path)
        return e

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self.db.execute(
            "SELECT 1 FROM e WHERE t = ? AND path = ?", (self.t, _key(path))).fetchone() is not None

    def __setitem__(self, path: str, e: Entry) -> None:
        self.db.execute(f"INSERT OR REPLACE INTO e VALUES (?, ?, {', '.join('?' * 11)})",
                        (self.t, _key(path), *_row(e)))

    def pop(self, path: str, default: Entry | None = None) -> Entry | None:
        e = self.get(path, default)
        self.db.execute("DELETE FROM e WHERE t = ? AND path = ?", (self.t, _key(path)))
        return e

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM e WHERE t = ?", (self.t,)).fetchone()[0]

    def items(self) -> Iterator[tuple[str, Entry]]:
        """In path order, streamed (a cursor of its own: the tree may be read meanwhile)."""
        for r in self.db.execute(f"SELECT path, {_COLS} FROM e WHERE t = ? ORDER BY path", (self.t,)):
            yield _path(r[0]), _entry(r[1:])

    def __iter__(self) -> Iterator[str]:
        return (p for p, _ in self.items())

    def keys(self) -> Iterator[str]:
        return iter(self)

    def _range(self, path: str) -> tuple[bytes, bytes]:
        lo = _key(path) + b"/" if path else b""
        return lo, (_key(path) + b"0" if path else b"\xff" * 4096)

    def drop_under(self, path: str, keep: set[str] | None = None) -> None:
        lo, hi = self._range(path)
        if keep is None:
            self.db.execute("DELETE FROM e WHERE t = ? AND path >= ? AND path < ?", (self.t, lo, hi))
            return
        gone = [(self.t, k) for (k,) in self.db.execute(
            "SELECT path FROM e WHERE t = ? AND path >= ? AND path < ?", (self.t, lo, hi)).fetchall()
            if _path(k) not in keep]
        self.db.executemany("DELETE FROM e WHERE t = ? AND path = ?", gone)

    def linked(self) -> list[tuple[str, Entry]]:
        """The files that name a hard link (few: loaded whole)."""
        return [(_path(r[0]), _entry(r[1:])) for r in self.db.execute(
            f"SELECT path, {_COLS} FROM e WHERE t = ? AND type = 'f' AND link != ''", (self.t,)).fetchall()]

    def differing(self, other: "StoredTree") -> Iterator[tuple[str, Entry | None, Entry | None]]:
        """Paths where this tree and ``other`` (same store) disagree, in path order:
        (path, this tree's entry or None, other's or None)."""
        q = (f"SELECT a.path, {', '.join('a.' + c for c in (*_KEY, 'mtime'))}, "
             f"{', '.join('b.' + c for c in (*_KEY, 'mtime'))} FROM e a LEFT JOIN e b ON b.t = ? AND b.path = a.path "
             f"WHERE a.t = ? AND (b.path IS NULL OR NOT ({_SAME}))")
        mine = self.db.execute(q, (other.t, self.t))
        only = self.db.execute("SELECT b.path FROM e b WHERE b.t = ? AND NOT EXISTS "
                               "(SELECT 1 FROM e a WHERE a.t = ? AND a.path = b.path) ORDER BY b.path",
                               (other.t, self.t))
        rows = sorted([(r[0], r) for r in mine] + [(r[0], None) for r in only], key=lambda x: x[0])
        for key, r in rows:
            if r is None:
                yield _path(key), None, other.get(_path(key))
            else:
                n = len(_KEY) + 1
                yield _path(key), _entry(r[1:1 + n]), (_entry(r[1 + n:]) if r[1 + n] is not None else None)

    def mtimes_differ(self, other: "StoredTree") -> int:
        """Paths both trees hold whose mtimes differ."""
        return self.db.execute("SELECT COUNT(*) FROM e a JOIN e b ON b.t = ? AND b.path = a.path "
                               "WHERE a.t = ? AND a.mtime IS NOT b.mtime", (other.t, self.t)).fetchone()[0]

    def drop(self) -> None:
        self.db.execute("DELETE FROM e WHERE t = ?", (self.t,))


def settle_links(tree: Tree) -> Tree:
    """Hard links as the merged tree has them, in one canonical form: a file stays linked
    only while the path it names is still that file (a later layer that replaced or
    removed it left a copy), and every group of linked paths names its first path in
    sorted order (written first, so each group is written in one layer as one inode)."""
    groups: dict[str, list[str]] = {}
    for path, e in _linked(tree):
        if e.type == "f" and e.link:
            t = tree.get(e.link)
            if t is None or t.type != "f" or t.link or replace(t, mtime=0) != replace(e, link="", mtime=0):
                tree[path] = replace(e, link="")
            else:
                groups.setdefault(e.link, []).append(path)
    for leader, members in groups.items():
        first = min([leader, *members])
        for p in [leader, *members]:
            tree[p] = replace(tree[p], link="" if p == first else first)
    return tree


def link_groups(tree: Mapping[str, Entry]) -> dict[str, list[str]]:
    """First path -> every path of its hard-link group (itself included)."""
    groups: dict[str, list[str]] = {}
    for path, e in _linked(tree):
        groups.setdefault(e.link, [e.link]).append(path)
    return groups


def _linked(tree: Mapping[str, Entry]) -> list[tuple[str, Entry]]:
    if isinstance(tree, StoredTree):
        return tree.linked()
    return [(p, e) for p, e in tree.items() if e.type == "f" and e.link]


def first_difference(want: Mapping[str, Entry], got: Mapping[str, Entry]) -> str | None:
    """The first path (in sorted order) where two trees disagree, or None."""
    if isinstance(want, StoredTree) and isinstance(got, StoredTree):
        return next((p for p, _, _ in want.differing(got)), None)
    for path in sorted(want.keys() | got.keys()):
        if want.get(path) != got.get(path):
            return path
    return None


def write_layer(items: Iterable[tuple[str, Entry | None]], out_dir: Path, spool: Spool, *,
                presorted: bool = False) -> oci.Layer:
    """A reproducible layer of ``items`` (path, entry; None is a whiteout), sorted by
    path (``presorted``: streamed as given, e.g. from a ``StoredTree``), contents from
    ``spool``, every entry's own mode, owner, mtime and xattrs."""
    with oci.layer_writer(out_dir) as (tar, done):
        for path, e in (items if presorted else sorted(items, key=lambda kv: kv[0])):
            if e is None:
                parent, _, base = path.rpartition("/")
                info = tarfile.TarInfo("/".join(x for x in (parent, WHITEOUT + base) if x))
                info.mode, info.mtime = 0o644, oci.EPOCH
                tar.addfile(info)
                continue
            info = tarfile.TarInfo(path)
            info.type, info.mode, info.uid, info.gid, info.mtime = _TAR_TYPES[e.type], e.mode, e.uid, e.gid, e.mtime
            info.uname = info.gname = ""
            info.linkname = e.link if e.type == "l" else ""
            info.devmajor, info.devminor = e.dev
            info.pax_headers = dict(e.xattrs)
            if e.type == "f" and e.link:  # the target sorts first (``settle_links``)
                info.type, info.linkname = tarfile.LNKTYPE, e.link
                tar.addfile(info)
                continue
            if e.type == "f":
                info.size = e.size
                try:
                    fh = open(spool.path(e.digest), "rb")
                except FileNotFoundError:
                    raise DeriveError(f"/{path}: its content {e.digest[:19]} was not kept while reading") from None
                with fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
    return done[0]

