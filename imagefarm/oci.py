"""OCI values: media types, content-addressed blobs, deterministic layers, layouts.

Layers are written reproducibly (sorted entries, fixed mtime, uid/gid 0, gzip with
no timestamp), streamed to disk while both digests are computed, so the same tree
always gives the same blob and a layer is never held in memory.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from imagefarm.errors import ConfigError

def parse_platform(text: str) -> dict[str, str]:
    """``linux/amd64`` or ``linux/arm64/v8`` -> OCI platform fields (``ConfigError`` if not)."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts) or any(c.isspace() for c in text.strip()):
        raise ConfigError(f"platform {text!r} must look like os/arch[/variant], e.g. linux/amd64")
    out = {"os": parts[0], "architecture": parts[1]}
    if len(parts) == 3:
        out["variant"] = parts[2]
    return out


# -- media types ---------------------------------------------------------------
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
LAYER_TYPES = (OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD, DOCKER_LAYER_GZIP, DOCKER_FOREIGN_LAYER)
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))

# -- annotations -----------------------------------------------------------------
ANN_BASE_NAME = "org.opencontainers.image.base.name"
ANN_BASE_DIGEST = "org.opencontainers.image.base.digest"
#: where the base's bytes were read (a mirror), when that is not the name above
ANN_BASE_SOURCE = "dev.imagefarm.base.source"
ANN_RECIPE = "dev.imagefarm.recipe"
ANN_RECIPE_DIGEST = "dev.imagefarm.recipe.digest"
ANN_AGENT_VERSION = "dev.imagefarm.agent-server.version"
ANN_PAYLOAD_DIGEST = "dev.imagefarm.payload.digest"
#: a re-layered image (derive.relayer): its group's id and the group-common layer
ANN_RELAYER_GROUP = "dev.imagefarm.relayer.group"
ANN_RELAYER_COMMON = "dev.imagefarm.relayer.common"

#: the fixed timestamp of every layer entry and history item (reproducible builds)
EPOCH = 0
EPOCH_ISO = "1970-01-01T00:00:00Z"


def canonical_json(obj: Any) -> bytes:
    """Byte-stable JSON: the same value always hashes to the same digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] | None = field(default=None, compare=False, hash=False)
    platform: dict[str, str] | None = field(default=None, compare=False, hash=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            out["platform"] = self.platform
        if self.annotations:
            out["annotations"] = self.annotations
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Descriptor":
        return cls(d["mediaType"], d["digest"], int(d["size"]), d.get("annotations"), d.get("platform"))


@dataclass(frozen=True, slots=True)
class Layer:
    """A layer blob: its compressed digest and size, and its diff_id; ``path`` is the
    file on disk, or None for a blob known only by its descriptor (kept in a registry)."""

    path: Path | None
    digest: str
    size: int
    diff_id: str
    media_type: str = OCI_LAYER_GZIP

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size)

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path) if self.path else None, "digest": self.digest, "size": self.size,
                "diff_id": self.diff_id, "media_type": self.media_type}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Layer":
        return cls(Path(d["path"]) if d.get("path") else None, d["digest"], int(d["size"]), d["diff_id"],
                   d.get("media_type", OCI_LAYER_GZIP))


class _HashingWriter(io.RawIOBase):
    def __init__(self, sink: BinaryIO) -> None:
        self.sink, self.hash, self.size = sink, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self.hash.update(b)
        self.size += len(b)
        return self.sink.write(b)


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = EPOCH
    info.uname = info.gname = ""
    info.pax_headers = {}
    return info


@contextlib.contextmanager
def layer_writer(out_dir: Path, *, level: int = 6) -> Iterator[tuple[tarfile.TarFile, list[Layer]]]:
    """A reproducible tar+gzip layer being written into ``out_dir``: yields the open
    tar stream and a list that holds the content-addressed ``Layer`` once the block
    ends (gzip with no name and mtime 0, both digests computed while writing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=".layer-", suffix=".tmp")
    tmp = Path(tmp_name)
    done: list[Layer] = []
    try:
        with os.fdopen(fd, "wb") as raw:
            outer = _HashingWriter(raw)
            with gzip.GzipFile(fileobj=outer, mode="wb", compresslevel=level, mtime=0, filename="") as gz:
                inner = _HashingWriter(gz)  # type: ignore[arg-type]
                with tarfile.open(fileobj=inner, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    yield tar, done
        diff_id = "sha256:" + inner.hash.hexdigest()
        digest = "sha256:" + outer.hash.hexdigest()
        final = out_dir / digest.replace(":", "-")
        tmp.replace(final)
        done.append(Layer(final, digest, outer.size, diff_id))
    finally:
        tmp.unlink(missing_ok=True)


def write_layer(
    entries: Iterable[tuple[str, Path | None, tarfile.TarInfo | None]] | None,
    out_dir: Path,
    *,
    root: Path | None = None,
    arc_prefix: str = "",
    owner: tuple[int, int] | None = (0, 0),
    level: int = 6,
    exclude: frozenset[str] = frozenset(),
) -> Layer:
    """Write a reproducible tar+gzip layer into ``out_dir`` (content addressed).

    Either ``root`` (a directory whose tree becomes ``arc_prefix/...``) or explicit
    ``entries`` of (archive name, source file or None, TarInfo template or None).
    ``owner`` forces uid/gid (None keeps the files' own); ``exclude`` lists paths
    relative to ``root`` left out with everything under them.
    """
    with layer_writer(out_dir, level=level) as (tar, done):
        items = _walk(root, arc_prefix, exclude) if root is not None else entries or []
        for name, src, template in items:
            _add(tar, name, src, template, owner)
    return done[0]


def _walk(root: Path, prefix: str, exclude: frozenset[str] = frozenset()):
    root = Path(root)
    prefix = prefix.strip("/")
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        base = "" if rel == "." else rel
        dirnames[:] = sorted(d for d in dirnames if os.path.join(base, d) not in exclude)
        if base:
            yield (f"{prefix}/{base}" if prefix else base), Path(dirpath), None
        names = [f for f in filenames if os.path.join(base, f) not in exclude]
        for name in sorted(names + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            p = Path(dirpath) / name
            arc = "/".join(x for x in (prefix, base, name) if x)
            yield arc, p, None


def _add(tar: tarfile.TarFile, name: str, src: Path | None, template: tarfile.TarInfo | None,
         owner: tuple[int, int] | None) -> None:
    if src is not None:
        info = tar.gettarinfo(str(src), arcname=name)
    elif template is not None:
        info = template
        info.name = name
    else:
        raise ValueError(f"layer entry {name!r} has neither a source nor a template")
    _normalise(info)
    if owner is not None:
        info.uid, info.gid = owner
    if info.isreg():
        if src is not None:
            with open(src, "rb") as fh:
                tar.addfile(info, fh)
        else:
            tar.addfile(info, io.BytesIO(getattr(template, "data", b"")))
    else:
        tar.addfile(info)


class _DataTarInfo(tarfile.TarInfo):
    """A TarInfo that carries its file's bytes (TarInfo itself has __slots__)."""

    data: bytes = b""


def file_entry(name: str, data: bytes, mode: int = 0o644) -> tuple[str, None, tarfile.TarInfo]:
    info = _DataTarInfo(name)
    info.size, info.mode, info.type = len(data), mode, tarfile.REGTYPE
    info.data = data
    return name, None, info


def dir_entry(name: str, mode: int = 0o755) -> tuple[str, None, tarfile.TarInfo]:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return name, None, info


def symlink_entry(name: str, target: str) -> tuple[str, None, tarfile.TarInfo]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
    return name, None, info


def image_config(
    layers: list[Layer],
    *,
    env: list[str] | None = None,
    cmd: list[str] | None = None,
    entrypoint: list[str] | None = None,
    working_dir: str | None = None,
    user: str | None = None,
    labels: dict[str, str] | None = None,
    architecture: str = "amd64",
    history: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if env:
        config["Env"] = env
    if cmd:
        config["Cmd"] = cmd
    if entrypoint:
        config["Entrypoint"] = entrypoint
    if working_dir:
        config["WorkingDir"] = working_dir
    if user:
        config["User"] = user
    if labels:
        config["Labels"] = labels
    return {
        "architecture": architecture,
        "os": "linux",
        "created": EPOCH_ISO,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]},
        "history": history or [{"created": EPOCH_ISO, "created_by": "imagefarm fixture"} for _ in layers],
    }


def image_manifest(config_blob: bytes, layers: list[Layer], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config_blob), "size": len(config_blob)},
        "layers": [l.descriptor.to_json() for l in layers],
    }
    if annotations:
        m["annotations"] = annotations
    return m


class OCILayout:
    """An OCI image layout directory: what skopeo reads as ``oci:DIR:TAG``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self._index = self.path / "index.json"
        if not self._index.exists():
            self._index.write_bytes(canonical_json({"schemaVersion": 2, "manifests": []}))

    def blob_path(self, digest: str) -> Path:
        return self.path / "blobs" / digest.replace(":", "/")

    def put_bytes(self, data: bytes) -> str:
        digest = sha256_digest(data)
        p = self.blob_path(digest)
        if not p.exists():
            p.write_bytes(data)
        return digest

    def put_layer(self, layer: Layer) -> None:
        p = self.blob_path(layer.digest)
        if not p.exists():
            try:
                os.link(layer.path, p)
            except OSError:
                shutil.copyfile(layer.path, p)

    def add_image(self, layers: list[Layer], config: dict[str, Any], tag: str,
                  annotations: dict[str, str] | None = None) -> Descriptor:
        for layer in layers:
            self.put_layer(layer)
        cfg = canonical_json(config)
        self.put_bytes(cfg)
        manifest = canonical_json(image_manifest(cfg, layers, annotations))
        digest = self.put_bytes(manifest)
        return self._tag(Descriptor(OCI_MANIFEST, digest, len(manifest)), tag)

    def add_index(self, manifests: list[Descriptor], tag: str) -> Descriptor:
        index = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                "manifests": [d.to_json() for d in manifests]})
        digest = self.put_bytes(index)
        return self._tag(Descriptor(OCI_INDEX, digest, len(index)), tag)

    def _tag(self, desc: Descriptor, tag: str) -> Descriptor:
        index = json.loads(self._index.read_text())
        key = "org.opencontainers.image.ref.name"
        index["manifests"] = [m for m in index["manifests"] if m.get("annotations", {}).get(key) != tag]
        entry = desc.to_json()
        entry["annotations"] = {key: tag}
        index["manifests"].append(entry)
        self._index.write_bytes(canonical_json(index))
        return desc
