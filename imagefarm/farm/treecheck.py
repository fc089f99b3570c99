"""``imagefarm verify --tree IMAGE``: an independent proof that a derived image holds its
base plus its top (payload) layer, file for file.

Nothing here shares a parser, cache or process with the code that made the image
(``imagefarm.derive``, its tree reader): ``skopeo copy`` fetches both images into an OCI
layout in a fresh directory, ``umoci unpack`` (a container engine's own unpacker, with
its whiteout and hard-link rules) makes their root filesystems, and the two trees are
walked with ``os.lstat``. The derived image minus its top layer must unpack to exactly
the base's tree: every path, type, mode, owner, size, content digest and link target
(mtimes are not compared: re-layering may normalise them). The top layer itself must be
the very blob the caller names (the payload), so base + payload and the derived image
are equal trees whatever the unpacker does with that layer, as it does it the same way
on both.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from imagefarm import oci
from imagefarm.errors import DeriveError, ToolError
from imagefarm.host.containers import run, which
from imagefarm.names.reference import parse
from imagefarm.settings import Settings


@dataclass(frozen=True)
class TreeProof:
    image: str
    base: str
    top_layer: str                  #: digest of the layer the derived image adds (the payload)
    paths: int                      #: paths compared
    differences: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences

    def to_json(self) -> dict:
        return {"image": self.image, "base": self.base, "top_layer": self.top_layer, "paths": self.paths,
                "ok": self.ok, "differences": self.differences}


def _copy(settings: Settings, ref: str, layout: Path, tag: str) -> None:
    r = parse(ref)
    tls = "false" if r.registry.insecure(settings) else "true"
    run(settings, ["skopeo", "copy", "--quiet", f"--src-tls-verify={tls}", f"docker://{ref}",
                   f"oci:{layout}:{tag}"], timeout=1800)


def _blob(layout: Path, digest: str) -> bytes:
    algo, hexd = digest.split(":", 1)
    return (layout / "blobs" / algo / hexd).read_bytes()


def _put_blob(layout: Path, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
    if not path.exists():
        path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def _manifest(layout: Path, tag: str) -> dict:
    index = json.loads((layout / "index.json").read_text())
    [desc] = [m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    return json.loads(_blob(layout, desc["digest"]))


def _without_top(layout: Path, tag: str, new_tag: str) -> str:
    """A manifest in ``layout`` tagged ``new_tag``: the image ``tag`` minus its top layer.
    Returns that top layer's digest."""
    m = _manifest(layout, tag)
    cfg = json.loads(_blob(layout, m["config"]["digest"]))
    top = m["layers"][-1]["digest"]
    cfg["rootfs"]["diff_ids"] = cfg["rootfs"]["diff_ids"][:-1]
    hist = cfg.get("history") or []
    for i in range(len(hist) - 1, -1, -1):  # drop the history entry of the top (non-empty) layer
        if not hist[i].get("empty_layer"):
            del hist[i]
            break
    cfg_desc = {"mediaType": oci.OCI_CONFIG, **_put_blob(layout, json.dumps(cfg).encode())}
    new = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "config": cfg_desc, "layers": m["layers"][:-1]}
    man_desc = {"mediaType": oci.OCI_MANIFEST, **_put_blob(layout, json.dumps(new).encode()),
                "annotations": {"org.opencontainers.image.ref.name": new_tag}}
    index = json.loads((layout / "index.json").read_text())
    index["manifests"].append(man_desc)
    (layout / "index.json").write_text(json.dumps(index))
    return top


def _unpack(layout: Path, tag: str, bundle: Path) -> Path:
    argv = [which("umoci"), "unpack", "--image", f"{layout}:{tag}", str(bundle)]
    if os.geteuid() != 0:
        argv.insert(2, "--rootless")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise ToolError(f"umoci unpack {tag} failed: {proc.stderr.strip()[-2000:]}")
    return bundle / "rootfs"


def walk(root: Path) -> dict[str, tuple]:
    """path -> (type, mode, uid, gid, size, sha256, link target, device) for every entry."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            digest = size = target = dev = None
            if kind == stat.S_IFREG:
                size = st.st_size
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                digest = h.hexdigest()
            elif kind == stat.S_IFLNK:
                target = os.readlink(p)
            elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                dev = st.st_rdev
            out[os.path.relpath(p, root)] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, digest,
                                             target, dev)
    return out


FIELDS = ("type", "mode", "uid", "gid", "size", "sha256", "link target", "device")


def compare(want: dict[str, tuple], got: dict[str, tuple], limit: int = 50) -> list[str]:
    diffs = []
    for path in sorted(want.keys() | got.keys()):
        a, b = want.get(path), got.get(path)
        if a == b:
            continue
        if a is None:
            diffs.append(f"{path}: in the derived image only")
        elif b is None:
            diffs.append(f"{path}: missing from the derived image")
        else:
            diffs.append(f"{path}: " + ", ".join(f"{n} {x!r} != {y!r}" for n, x, y in zip(FIELDS, a, b) if x != y))
        if len(diffs) >= limit:
            diffs.append("... (more)")
            break
    return diffs


def prove_tree(settings: Settings, image: str, *, payload_digest: str | None = None,
               work: Path | None = None) -> TreeProof:
    """Fetch ``image`` and the base its annotations name, unpack both with umoci and
    compare (see the module docstring). ``payload_digest``: the top layer must be this
    blob. Raises ``DeriveError`` when the image names no base."""
    tmp = Path(tempfile.mkdtemp(prefix="treecheck-", dir=work))
    try:
        layout = tmp / "layout"
        _copy(settings, image, layout, "derived")
        m = _manifest(layout, "derived")
        ann = m.get("annotations") or {}
        name, digest = ann.get(oci.ANN_BASE_NAME), ann.get(oci.ANN_BASE_DIGEST)
        if not name or not digest:
            raise DeriveError(f"{image} names no base ({oci.ANN_BASE_NAME} / {oci.ANN_BASE_DIGEST} missing): "
                              "nothing to compare it with")
        base = parse(name).with_digest(digest).pinned
        _copy(settings, str(base), layout, "base")  # one layout: shared blobs are fetched once
        top = _without_top(layout, "derived", "derived-lower")
        diffs = []
        if payload_digest and top != payload_digest:
            diffs.append(f"top layer is {top}, not the payload {payload_digest}")
        want = walk(_unpack(layout, "base", tmp / "base"))
        got = walk(_unpack(layout, "derived-lower", tmp / "derived"))
        diffs += compare(want, got)
        return TreeProof(image, str(base), top, len(want.keys() | got.keys()), diffs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
