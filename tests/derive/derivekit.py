"""Helpers for the derive tests: tiny busybox-based bases (a shell, so podman and
buildah can run them) pushed with skopeo from an OCI layout, and a synthetic payload
layer (a script at /usr/local/bin/openhands-agent-server) so tests never wait for
the real payload build."""

from __future__ import annotations

import shutil
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
