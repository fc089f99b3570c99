"""Root filesystem trees read from layer blobs as they stream, and written back.

A layer is read once, in stream mode (tar over gzip over the registry's chunks: no
layer is ever whole in memory or on disk), both its digest and diff_id checked while
reading, each file's content hashed and, for layers whose files may be written
again, kept once per content digest in a ``Spool`` on disk. Applying layers in
order (whiteouts and opaque directories as the OCI image spec says) gives the merged
tree an image's container sees: ``{path: Entry}``.

What two trees must agree on is ``Entry`` equality: type, mode, owner, content
digest, link target, device numbers and xattrs. The mtime is carried (and written
back) but not compared: git stamps every checkout, pip every install, with the time
they ran, so consecutive commits of one repository would share no file at all if it
were; nothing a repository's tests read depends on it (a timestamp-based ``.pyc``
whose source has another mtime is recompiled, not misread). Hard links are read as
the regular files they name and written as copies: same content, mode and owner.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

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
    link: str = ""                #: a symlink's target
    dev: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[str, str], ...] = ()
    mtime: float = field(default=0, compare=False)

    def describe(self) -> str:
        what = {"f": f"file {self.digest[:19]} ({self.size} B)", "d": "directory", "l": f"symlink -> {self.link}",
                "c": f"char device {self.dev}", "b": f"block device {self.dev}", "p": "fifo"}[self.type]
        extra = f" xattrs {dict(self.xattrs)}" if self.xattrs else ""
        return f"{what} mode {self.mode:o} owner {self.uid}:{self.gid}{extra}"


Tree = dict[str, Entry]
#: one layer as data: ("add", path, entry), ("wh", path, None), ("opq", dir, None)
Op = tuple[str, str, Entry | None]


class Spool:
    """File contents on disk, one copy per content digest (what re-layering writes back)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / digest.split(":", 1)[1]

    def put(self, fh: io.BufferedIOBase | None) -> tuple[str, int]:
        """Hash ``fh`` to its end while keeping it here once; (digest, size). A small
        file is hashed in memory first (most are kept already: siblings share them)."""
        head = fh.read(CHUNK) if fh is not None else b""
        if len(head) < CHUNK:
            digest = "sha256:" + hashlib.sha256(head).hexdigest()
            if not self.path(digest).exists():
                self._keep(digest, [head])
            return digest, len(head)
        h, n = hashlib.sha256(head), len(head)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".in-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(head)
                while chunk := fh.read(CHUNK):
                    h.update(chunk)
                    n += len(chunk)
                    out.write(chunk)
            digest = "sha256:" + h.hexdigest()
            os.replace(tmp, self.path(digest))
            return digest, n
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


class _Chunks(io.RawIOBase):
    """A readable file over an iterator of byte chunks, hashing what passes through."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it, self._buf = iter(chunks), memoryview(b"")
        self.hash, self.size = hashlib.sha256(), 0

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
            self._buf = memoryview(chunk)
        n = min(len(b), len(self._buf))
        b[:n], self._buf = self._buf[:n], self._buf[n:]
        return n

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def norm(name: str) -> str:
    """A tar member name as a tree path: no leading ``./`` or ``/``, no trailing ``/``."""
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/") if name not in (".", "./") else ""


def read_ops(chunks: Iterable[bytes], desc: oci.Descriptor, diff_id: str | None, *, below: Mapping[str, Entry],
             spool: Spool | None, where: str) -> list[Op]:
    """One layer blob, streamed, as ops; its digest and diff_id are checked at the end.
    ``below`` resolves hard links to files of lower layers; ``spool`` keeps contents."""
    if desc.media_type not in (*_GZIP, *_TAR):
        raise DeriveError(f"{where}: layer {desc.digest[:19]} is {desc.media_type}; re-layering reads "
                          "tar and tar+gzip layers")
    raw = _Chunks(chunks)
    buffered = io.BufferedReader(raw, CHUNK)
    stream = gzip.GzipFile(fileobj=buffered, mode="rb") if desc.media_type in _GZIP else buffered
    inner = _Chunks(iter(lambda: stream.read(CHUNK), b""))
    ops: list[Op] = []
    files: dict[str, Entry] = {}
    keep = spool.put if spool is not None else _hash_only
    try:
        with tarfile.open(fileobj=io.BufferedReader(inner, CHUNK), mode="r|") as tar:
            for m in tar:
                path = norm(m.name)
                base = path.rsplit("/", 1)[-1]
                parent = path.rsplit("/", 1)[0] if "/" in path else ""
                if not path:
                    continue
                if base == OPAQUE:
                    ops.append(("opq", parent, None))
                    continue
                if base.startswith(WHITEOUT):
                    ops.append(("wh", "/".join(x for x in (parent, base[len(WHITEOUT):]) if x), None))
                    continue
                xattrs = tuple(sorted((k, v) for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")))
                common = dict(mode=m.mode, uid=m.uid, gid=m.gid, xattrs=xattrs, mtime=m.mtime)
                if m.islnk():
                    target = files.get(norm(m.linkname)) or below.get(norm(m.linkname))
                    if target is None or target.type != "f":
                        raise DeriveError(f"{where}: hard link /{path} names /{norm(m.linkname)}, "
                                          "which is no file of this image")
                    e = Entry("f", digest=target.digest, size=target.size, **common)
                elif m.isreg():
                    digest, size = keep(tar.extractfile(m))
                    e = Entry("f", digest=digest, size=size, **common)
                elif m.type in _TYPES:
                    e = Entry(_TYPES[m.type], link=m.linkname if m.issym() else "",
                              dev=(m.devmajor, m.devminor) if m.ischr() or m.isblk() else (0, 0), **common)
                else:
                    raise DeriveError(f"{where}: /{path} is a tar member of type {m.type!r}")
                if e.type == "f":
                    files[path] = e
                ops.append(("add", path, e))
        inner.drain()
        raw.drain()
    except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DeriveError(f"{where}: layer {desc.digest[:19]} is no readable tar stream: {exc}") from None
    if "sha256:" + raw.hash.hexdigest() != desc.digest:
        raise DeriveError(f"{where}: layer {desc.digest[:19]} read back with another digest")
    if diff_id and "sha256:" + inner.hash.hexdigest() != diff_id:
        raise DeriveError(f"{where}: layer {desc.digest[:19]} does not match its diff_id {diff_id[:19]}")
    return ops


def _drop_under(tree: Tree, path: str) -> None:
    prefix = path + "/" if path else ""
    for p in [p for p in tree if p.startswith(prefix)]:
        del tree[p]


def apply(tree: Tree, ops: Iterable[Op]) -> Tree:
    """Apply one layer's ops to ``tree`` in place: its whiteouts and opaque dirs hide
    what lower layers put there, then its entries land (a non-directory over a
    directory replaces the whole subtree)."""
    ops = list(ops)
    for op, path, _ in ops:
        if op == "opq":
            _drop_under(tree, path)
        elif op == "wh":
            tree.pop(path, None)
            _drop_under(tree, path)
    for op, path, e in ops:
        if op != "add":
            continue
        old = tree.get(path)
        if old is not None and old.type == "d" and e.type != "d":
            _drop_under(tree, path)
        tree[path] = e
    return tree


def first_difference(want: Mapping[str, Entry], got: Mapping[str, Entry]) -> str | None:
    """The first path (in sorted order) where two trees disagree, or None."""
    for path in sorted(want.keys() | got.keys()):
        if want.get(path) != got.get(path):
            return path
    return None


def write_layer(items: Iterable[tuple[str, Entry | None]], out_dir: Path, spool: Spool) -> oci.Layer:
    """A reproducible layer of ``items`` (path, entry; None is a whiteout), sorted by
    path, contents from ``spool``, every entry's own mode, owner, mtime and xattrs."""
    with oci.layer_writer(out_dir) as (tar, done):
        for path, e in sorted(items, key=lambda kv: kv[0]):
            if e is None:
                parent, _, base = path.rpartition("/")
                info = tarfile.TarInfo("/".join(x for x in (parent, WHITEOUT + base) if x))
                info.mode, info.mtime = 0o644, oci.EPOCH
                tar.addfile(info)
                continue
            info = tarfile.TarInfo(path)
            info.type, info.mode, info.uid, info.gid, info.mtime = _TAR_TYPES[e.type], e.mode, e.uid, e.gid, e.mtime
            info.uname = info.gname = ""
            info.linkname = e.link
            info.devmajor, info.devminor = e.dev
            info.pax_headers = dict(e.xattrs)
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

