"""Manifests kept by digest, so a counted GET is paid once per manifest, not per read.

A public registry counts manifest GETs and not HEADs. A HEAD gives the digest a tag
names now; the bytes for a digest never change. So a read by tag is HEAD, then these
bytes if they were read before (by the plan, an earlier batch, another base of the same
index), else one GET. Entries are written atomically and checked against their digest
when read: a damaged entry is a miss, never a wrong manifest.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from imagefarm import oci
from imagefarm.host.statedir import state_subdir
from . import manifests as mf

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class ManifestCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, digest: str) -> Path:
        return self.root / digest.replace(":", "-")

    def get(self, digest: str, where: str) -> mf.Manifest | mf.Index | None:
        if not DIGEST.fullmatch(digest or ""):  # a header's text is no path until checked
            return None
        try:
            media_type, _, raw = self._path(digest).read_bytes().partition(b"\n")
        except OSError:
            return None
        if oci.sha256_digest(raw) != digest:
            return None
        return mf.parse_manifest(raw, media_type.decode(), digest=digest, where=where)

    def put(self, got: mf.Manifest | mf.Index) -> None:
        if not DIGEST.fullmatch(got.digest):
            return
        state_subdir(self.root.parent, self.root.name)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".put-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(got.media_type.encode() + b"\n" + got.raw)
        os.replace(tmp, self._path(got.digest))
