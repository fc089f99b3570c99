"""registry/streams on its own: one-shot bodies refuse a replay, counts are of bytes
sent, re-chunking keeps every byte in order, a size limit stops the read."""

from __future__ import annotations

import httpx
import pytest

from imagefarm.errors import TransientRegistryError, UnsupportedMedia
from imagefarm.registry.streams import CHUNK, Counted, file_chunks, once, read_limited, rechunk


def test_a_one_shot_body_is_handed_out_once():
    body = once(iter([b"ab", b"c"]))
    assert b"".join(body()) == b"abc"
    with pytest.raises(TransientRegistryError, match="cannot be replayed"):
        body()


def test_counted_counts_what_was_consumed():
    c = Counted([b"abc", b"", b"de"])
    it = iter(c)
    next(it)
    assert c.n == 3  # counted as sent, not ahead
    assert b"".join(it) == b"de" and c.n == 5


@pytest.mark.parametrize("parts,size", [([b"abcdefg"], 3), ([b"a", b"bc", b"", b"defgh"], 2),
                                        ([b"abcdef"], 6), ([], 4), ([b"ab"], 5)])
def test_rechunk_keeps_every_byte_in_order_in_full_chunks_but_the_last(parts, size):
    out = list(rechunk(parts, size))
    assert b"".join(out) == b"".join(parts)
    assert all(len(c) == size for c in out[:-1]) and all(0 < len(c) <= size for c in out)


def test_file_chunks_reads_the_whole_file_in_chunks(tmp_path):
    data = bytes(range(256)) * (CHUNK // 256 * 2 + 3)
    (tmp_path / "blob").write_bytes(data)
    chunks = list(file_chunks(tmp_path / "blob"))
    assert b"".join(chunks) == data and len(chunks) == 3 and len(chunks[0]) == CHUNK
    (tmp_path / "empty").write_bytes(b"")
    assert list(file_chunks(tmp_path / "empty")) == []


def test_read_limited_reads_up_to_the_limit_and_refuses_beyond():
    assert read_limited(httpx.Response(200, content=b"x" * 10), 10, "m") == b"x" * 10
    with pytest.raises(UnsupportedMedia, match="m: manifest is over the 9 byte limit"):
        read_limited(httpx.Response(200, content=b"x" * 10), 9, "m")
