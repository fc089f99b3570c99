"""Helpers for the derive tests: tiny busybox-based bases (a shell, so podman and
buildah can run them) pushed with skopeo from an OCI layout, and a synthetic payload
layer (a script at /usr/local/bin/openhands-agent-server) so tests never wait for
the real payload build."""

from __future__ import annotations

import shutil
import tarfile
import subprocess
from pathlib import Path

from imagefarm import oci
from imagefarm.derive import AppendPayload

BUSYBOX = Path(shutil.which("busybox") or "/usr/bin/busybox")
BASE_ENV = ["PATH=/testbed/.venv/bin:/bin", "VIRTUAL_ENV=/testbed/.venv", "LANG=C.UTF-8"]
RECIPE_DIGEST = "sha256:" + "5" * 64


def busybox_layer(blobs: Path) -> oci.Layer:
    entries = [oci.dir_entry("bin"), ("bin/busybox", BUSYBOX, None)]
    entries += [oci.symlink_entry(f"bin/{n}", "busybox") for n in ("sh", "cat", "echo", "ls", "id")]
    return oci.write_layer(entries, blobs)


def file_layer(blobs: Path, name: str, text: str) -> oci.Layer:
    return oci.write_layer([oci.dir_entry("testbed"), oci.file_entry(f"testbed/{name}", text.encode())], blobs)


def push_base(work: Path, ref: str, layers: list[oci.Layer], *, fmt: str = "oci",
              user: str | None = "1000") -> None:
    """Write an r2e-shaped image (env, /testbed workdir, user) and skopeo-copy it to ``ref``."""
    layout = oci.OCILayout(work / "layout")
    config = oci.image_config(layers, env=BASE_ENV, working_dir="/testbed", user=user,
                              cmd=["/bin/sh"])
    layout.add_image(layers, config, "base")
    fmt_flags = ["--format", "v2s2"] if fmt == "v2s2" else []
    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", *fmt_flags,
                    f"oci:{layout.path}:base", f"docker://{ref}"],
                   check=True, capture_output=True, text=True, timeout=120)


def synthetic_payload(blobs: Path, version: str = "1.58.2", name: str = "default",
                      digest: str = RECIPE_DIGEST, env: tuple[str, ...] = ("LITELLM_LOCAL_MODEL_COST_MAP=True",)
                      ) -> AppendPayload:
    script = b"#!/bin/sh\necho openhands-agent-server stand-in \"$@\"\n"
    layer = oci.write_layer([oci.dir_entry("usr"), oci.dir_entry("usr/local"), oci.dir_entry("usr/local/bin"),
                             oci.file_entry("usr/local/bin/openhands-agent-server", script, 0o755)], blobs)
    return AppendPayload(layer, name, digest, version, env)


def skopeo_json(ref: str, *flags: str) -> dict:
    import json
    out = subprocess.run(["skopeo", "inspect", "--tls-verify=false", *flags, f"docker://{ref}"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return json.loads(out)


# -- hostile layers --------------------------------------------------------------------
def _gf2_times(mat: list[int], vec: int) -> int:
    s, i = 0, 0
    while vec:
        if vec & 1:
            s ^= mat[i]
        vec >>= 1
        i += 1
    return s


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib's crc32_combine (the CRC of A+B from those of A and B): the CRC of gigabytes
    of zeros without reading them."""
    if len2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]
    even = [_gf2_times(odd, odd[n]) for n in range(32)]
    odd = [_gf2_times(even, even[n]) for n in range(32)]
    while True:
        even = [_gf2_times(odd, odd[n]) for n in range(32)]
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = [_gf2_times(even, even[n]) for n in range(32)]
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


def gzip_bomb(blobs: Path, size: int = 8 << 30, name: str = "testbed/zeros") -> oci.Layer:
    """A tar+gzip layer holding one file of ``size`` zero bytes, made in a second and
    about size/1000 bytes on disk, never written unpacked: deflate blocks of 1 MiB of
    zeros, each after a full flush, are byte-identical, so one is repeated. Its diff_id
    is a made-up digest (a hostile config may say anything; computing the real one
    would mean hashing ``size`` bytes)."""
    import gzip as _gzip
    import hashlib
    import struct
    import tarfile
    import zlib

    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o644
    head = info.tobuf(format=tarfile.PAX_FORMAT)
    mib = bytes(1 << 20)
    assert size % len(mib) == 0
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH) == block  # the repeat is exact
    tail_raw = bytes(1024)  # the end-of-archive blocks
    tail = c.compress(tail_raw) + c.flush(zlib.Z_FINISH)
    zeros_crc = zlib.crc32(mib)
    n = 1 << 20
    while n < size:
        zeros_crc, n = crc32_combine(zeros_crc, zeros_crc, n), 2 * n
    assert n == size, "size must be 1 MiB times a power of two"
    crc = crc32_combine(crc32_combine(zlib.crc32(head), zeros_crc, size), zlib.crc32(tail_raw), len(tail_raw))
    total = len(head) + size + len(tail_raw)
    blobs.mkdir(parents=True, exist_ok=True)
    tmp = blobs / ".bomb.tmp"
    h, written = hashlib.sha256(), 0
    with open(tmp, "wb") as out:
        def put(b: bytes) -> None:
            nonlocal written
            h.update(b)
            out.write(b)
            written += len(b)
        put(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")
        put(first)
        for _ in range(size // len(mib)):
            put(block)
        put(tail)
        put(struct.pack("<II", crc, total & 0xFFFFFFFF))
    digest = "sha256:" + h.hexdigest()
    path = blobs / digest.replace(":", "-")
    tmp.replace(path)
    del _gzip
    return oci.Layer(path, digest, written, "sha256:" + hashlib.sha256(b"not the real diff_id").hexdigest())


def go_tar(members: list[tuple["tarfile.TarInfo", bytes | None]]) -> bytes:
    """An uncompressed tar as Go's archive/tar writes one (Docker, buildah, podman): the
    file-type bits in each header's mode field (Python's tarfile drops them)."""
    import io
    import stat
    import tarfile

    type_bits = {tarfile.DIRTYPE: stat.S_IFDIR, tarfile.REGTYPE: stat.S_IFREG, tarfile.SYMTYPE: stat.S_IFLNK,
                 tarfile.LNKTYPE: stat.S_IFREG}
    out = io.BytesIO()
    for info, data in members:
        buf = bytearray(info.tobuf(format=tarfile.PAX_FORMAT))
        at = len(buf) - 512  # the member's own header, after any PAX header
        mode = info.mode | type_bits.get(info.type, 0)
        buf[at + 100:at + 108] = b"%07o\0" % mode
        buf[at + 148:at + 156] = b" " * 8
        buf[at + 148:at + 156] = b"%06o\0 " % (sum(buf[at:at + 512]))
        out.write(buf)
        if data:
            out.write(data + bytes(-len(data) % 512))
    out.write(bytes(1024))
    return out.getvalue()


def buildah_group(settings, host: str, repo: str, work: Path, n: int, compression: str = "gzip",
                  mtime: float = 1_700_000_000) -> list[str]:
    """``n`` images of one repository made as Docker or podman would make them: buildah
    copies a /testbed tree onto a shared busybox base and commits, and pushes with
    ``compression`` (gzip or zstd): Go's archive/tar writes every layer. Each /testbed
    holds shared files (one with a hard link), a symlink, a 0750 directory, a file of
    its own and, from the second image on, one shared file changed; the third image's
    copy of one shared file has another mtime."""
    import os

    from imagefarm.host.containers import run

    base = f"localhost/{repo.replace('/', '-')}-base"
    if run(settings, ["buildah", "images", "-q", base], check=False).returncode != 0:
        c = run(settings, ["buildah", "from", "scratch"]).stdout.strip()
        root = work / "base-root"
        (root / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copy2(BUSYBOX, root / "bin/busybox")
        for name in ("sh", "ls", "cat"):
            if not (root / "bin" / name).exists():
                os.symlink("busybox", root / "bin" / name)
        run(settings, ["buildah", "copy", c, str(root), "/"])
        run(settings, ["buildah", "config", "--env", "PATH=/bin", "--workingdir", "/testbed", c])
        run(settings, ["buildah", "commit", "--rm", "-q", c, base])
    refs = []
    for i in range(n):
        tree = work / f"{repo.replace('/', '-')}-{compression}-{i}" / "testbed"
        (tree / "pkg").mkdir(parents=True, exist_ok=True)
        (tree / "private").mkdir(exist_ok=True)
        os.chmod(tree / "private", 0o750)
        for k in range(20):
            (tree / "pkg" / f"mod_{k}.py").write_text(f"# module {k}\n" + "x = 1\n" * (50 + k))
        if i:
            (tree / "pkg" / "mod_0.py").write_text(f"# module 0, changed at commit {i}\n")
        (tree / "README").write_text("shared readme\n" * 40)
        if not (tree / "README.link").exists():
            os.link(tree / "README", tree / "README.link")
        if not (tree / "latest").is_symlink():
            os.symlink("pkg/mod_1.py", tree / "latest")
        (tree / "private" / f"own_{i}").write_text(f"image {i}\n")
        # differs per compression: else buildah reuses the layer the other push compressed
        (tree / "pushed-with").write_text(compression)
        for p in [tree, *sorted(tree.rglob("*"))]:
            os.utime(p, (mtime, mtime), follow_symlinks=False)
        if i == 2:  # the same file, touched later in one image only
            os.utime(tree / "pkg" / "mod_5.py", (mtime + 100, mtime + 100))
        c = run(settings, ["buildah", "from", "--pull-never", base]).stdout.strip()
        run(settings, ["buildah", "copy", c, str(tree.parent), "/"])  # /testbed with its own mtime
        local = f"localhost/{repo.replace('/', '-')}:{compression}-{i}"
        run(settings, ["buildah", "commit", "--rm", "-q", c, local])
        ref = f"{host}/{repo}:{compression}-{i}"
        run(settings, ["buildah", "push", "-q", "--tls-verify=false", "--compression-format", compression,
                       local, f"docker://{ref}"])
        refs.append(ref)
    return refs
