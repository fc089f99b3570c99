"""Section: cold payload pulls, old layout (every file a file) beside the zip layout."""

from __future__ import annotations

from typing import Any

from ..fmt import mb, sec
from . import Context, Section


def body(r: dict[str, Any], ctx: Context) -> list[str]:
    L: list[str] = []
    w = L.append
    w("Each recipe's payload published as its one-layer image (`payload push`) in a loopback docker-registry, "
      "then `podman pull` into empty private storage (the project's containers.conf/storage.conf, overlay), "
      f"{r['rounds']} round(s) each, old `tree` and new `zip` layout interleaved in one run. Beside it, the same "
      "blob in parts, each alone: download (HTTP GET), decompress (`gzip -dc` to /dev/null), unpack (`tar -x` of "
      "the uncompressed tar on the storage's filesystem). Boot: `podman run` of the payload's own command from "
      "that storage to the first 2xx on the recipe's ready path.")
    w("")
    w("| recipe | layout | entries | files | gzip | unpacked | download | decompress | unpack | cold pull | boot |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for x in r["rows"]:
        n = lambda k: f"{x[k]:,}" if x.get(k) is not None else "—"  # noqa: E731
        w(f"| {x['recipe']} | {x['layout']} | {n('entries')} | {n('files')} | {mb(x['compressed_bytes'])} | "
          f"{mb(x.get('uncompressed_bytes'))} | {sec(x.get('download_s'))} | {sec(x.get('decompress_s'))} | "
          f"{sec(x.get('unpack_s'))} | {sec(x['pull_s'])} | {sec(x.get('boot_s'))} |")
    w("")
    return L


SECTION = Section(
    "coldpull",
    8.5,
    body,
    title="## 8b. Cold payload pulls: files, not bytes (old tree layout vs zip layout)",
)
