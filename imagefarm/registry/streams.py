"""Byte streams for blob transfers: counted, re-chunked, size-limited, and one-shot
bodies that refuse to be replayed (an upload from an iterator cannot restart)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx

from imagefarm.errors import TransientRegistryError, UnsupportedMedia

CHUNK = 1 << 20


class OneShot:
    """Body factory for a single-use iterator: a retry that needs it again is refused."""

    def __init__(self, it: Iterable[bytes]):
        self._it, self._used = it, False

    def __call__(self) -> Iterable[bytes]:
        if self._used:
            raise TransientRegistryError("upload from a one-shot stream failed part way and cannot be replayed")
        self._used = True
        return self._it


class Counted:
    """Counts the bytes an upload actually sent (for ``blob_bytes_uploaded``)."""

    def __init__(self, it: Iterable[bytes]):
        self._it, self.n = it, 0

    def __iter__(self) -> Iterator[bytes]:
        for c in self._it:
            self.n += len(c)
            yield c


def once(it: Iterable[bytes]) -> "OneShot":
    return OneShot(it)


def file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def rechunk(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    buf = bytearray()
    for c in chunks:
        buf += c
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


def read_limited(resp: httpx.Response, limit: int, what: str) -> bytes:
    buf = bytearray()
    for c in resp.iter_bytes(CHUNK):
        buf += c
        if len(buf) > limit:
            raise UnsupportedMedia(f"{what}: manifest is over the {limit} byte limit")
    return bytes(buf)
