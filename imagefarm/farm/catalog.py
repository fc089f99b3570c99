"""Datasets in, unique normalised base references out.

Reads the dataset shapes this field uses:

* R2E-Gym on the Hugging Face hub (``R2E-Gym/R2E-Gym-Subset``, ``R2E-Gym/R2E-Gym-V1``):
  parquet shards with a ``docker_image`` column;
* SkyRL's processed parquet (``r2e-all/train.parquet``): an ``instance`` struct whose
  ``instance_id`` is the image for ``data_source == "r2e-gym"``; SWE-bench rows map to
  ``swebench/sweb.eval.x86_64.<id with __ as _1776_>:latest`` as the SWE-bench harness
  names them (``instance.image_name`` wins where present);
* plain parquet or jsonl with a ``docker_image``/``image``/``image_name`` column, and text
  files with one reference per line.

Bad rows (no image column, malformed reference) are reported where people look for them
and skipped: ``line N`` of a jsonl or text file counts from 1, as editors and ``sed -n Np``
do (the second line is "line 2"); ``row N (0-based)`` of a parquet file is the index
pyarrow and pandas' ``iloc`` take. Duplicates are collapsed, keeping first-seen order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from imagefarm.errors import DatasetError, ImagefarmError, InvalidReference
from imagefarm.names.reference import Reference, parse

IMAGE_COLUMNS = ("docker_image", "image", "image_name")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".txt", ".list")


@dataclass(frozen=True)
class Instance:
    """One dataset row that needs an image."""

    instance_id: str
    base: Reference
    split: str
    row: int                #: line number (jsonl, text; from 1) or row index (parquet; from 0)
    data_source: str = ""


@dataclass(frozen=True)
class BadRow:
    source: str
    row: int                #: line number (from 1) when ``unit`` is "line", else row index (from 0)
    reason: str
    unit: str = "line"      #: "line" (jsonl, text) or "row" (parquet)

    def __str__(self) -> str:
        where = f"line {self.row}" if self.unit == "line" else f"row {self.row} (0-based)"
        return f"{self.source} {where}: {self.reason}"


@dataclass(frozen=True)
class Catalog:
    instances: tuple[Instance, ...]
    bad_rows: tuple[BadRow, ...] = ()
    sources: tuple[str, ...] = field(default=())

    @property
    def bases(self) -> tuple[Reference, ...]:
        """Unique base references in first-seen order."""
        seen: dict[str, Reference] = {}
        for inst in self.instances:
            seen.setdefault(str(inst.base), inst.base)
        return tuple(seen.values())

    def limited(self, n: int | None) -> "Catalog":
        """The instances whose base is among the first ``n`` unique bases."""
        if n is None:
            return self
        keep = {str(b) for b in self.bases[:n]}
        return Catalog(tuple(i for i in self.instances if str(i.base) in keep), self.bad_rows, self.sources)


def swebench_image(instance_id: str) -> str:
    """The SWE-bench harness's image name for an instance id."""
    return f"docker.io/swebench/sweb.eval.x86_64.{instance_id.replace('__', '_1776_')}:latest".lower()


def _ref_text(value: Any, field: str) -> str | None:
    """A reference-valued field as text; anything but a string is bad input."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidReference(f"{field} is {value!r} ({type(value).__name__}), not an image reference")
    return value


def image_of(row: dict[str, Any]) -> tuple[str | None, str, str]:
    """(image, instance id, data source) of one row, in any supported shape.

    ``InvalidReference`` when a reference field holds something other than text."""
    source = str(row.get("data_source") or "")
    inst = row.get("instance")
    if isinstance(inst, str):
        try:
            inst = json.loads(inst)
        except ValueError:
            inst = None
    if isinstance(inst, dict):
        iid = _ref_text(inst.get("instance_id"), "instance.instance_id") or ""
        for key in ("image_name", "docker_image"):
            if image := _ref_text(inst.get(key), f"instance.{key}"):
                return image, iid, source
        if source.startswith(("swe-bench", "swe_bench")) or ("__" in iid and "/" not in iid):
            return (swebench_image(iid) if iid else None), iid, source
        return (iid or None), iid, source
    for col in IMAGE_COLUMNS:
        if image := _ref_text(row.get(col), col):
            iid = str(row.get("instance_id") or image)
            return image, iid, source
    return None, str(row.get("instance_id") or ""), source


def _rows_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path}: not a readable parquet file ({exc})") from None
    wanted = [c for c in ("instance", "data_source", "instance_id", *IMAGE_COLUMNS) if c in pf.schema_arrow.names]
    if not wanted:
        raise DatasetError(
            f"{path}: no image column (looked for 'instance' or one of {', '.join(IMAGE_COLUMNS)}; "
            f"found {', '.join(pf.schema_arrow.names[:12])})"
        )
    try:
        i = 0
        for batch in pf.iter_batches(columns=wanted, batch_size=4096):
            for row in batch.to_pylist():
                yield i, row
                i += 1
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path}: parquet file is damaged ({exc})") from None


def _rows_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                yield n, BadRow(path.name, n, f"not JSON ({exc.msg})")
                continue
            yield n, row if isinstance(row, dict) else {"docker_image": row}


def _rows_text(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            line = line.split("#", 1)[0].strip()
            if line:
                yield n, {"docker_image": line}


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    """(where, row): the line number from 1 (jsonl, text) or the row index from 0 (parquet)."""
    if path.suffix == ".parquet":
        return _rows_parquet(path)
    if path.suffix in (".jsonl", ".json"):
        return _rows_jsonl(path)
    return _rows_text(path)


def _split_of(path: Path) -> str:
    return path.stem.split("-")[0].split(".")[0]


def resolve_files(spec: str) -> list[Path]:
    """Files behind a dataset spec: a file, a directory, or a hub dataset id."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
        if not files:
            raise DatasetError(f"{spec}: directory holds no .parquet, .jsonl or .txt files")
        return files
    repo = spec.removeprefix("hf:").removeprefix("hf://datasets/")
    if repo.count("/") != 1 or spec.startswith((".", "/")):
        raise DatasetError(
            f"dataset {spec!r} is neither a file, a directory, nor a hub dataset id like R2E-Gym/R2E-Gym-Subset"
        )
    return _hub_files(repo)


def _hub_files(repo: str) -> list[Path]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        root = Path(snapshot_download(repo, repo_type="dataset", allow_patterns=["*.parquet", "*.jsonl"]))
    except LocalEntryNotFoundError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise DatasetError(
            f"hub dataset {repo!r} is not in the local cache"
            + (" and HF_HUB_OFFLINE=1 forbids downloading it" if offline else " and could not be downloaded")
            + f": `huggingface-cli download {repo} --repo-type dataset` on a machine with access"
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise DatasetError(f"hub dataset {repo!r} could not be read: {exc}") from exc
    files = sorted(p for p in root.rglob("*") if p.suffix in (".parquet", ".jsonl"))
    if not files:
        raise DatasetError(f"hub dataset {repo!r} has no parquet or jsonl files")
    return files


def load(spec: str, *, splits: tuple[str, ...] | None = None) -> Catalog:
    """Read every row of a dataset; bad rows are reported, never fatal."""
    instances: list[Instance] = []
    bad: list[BadRow] = []
    files = resolve_files(spec)
    used = []
    for path in files:
        split = _split_of(path)
        if splits and split not in splits:
            continue
        used.append(str(path))
        unit = "row" if path.suffix == ".parquet" else "line"
        try:
            for i, row in _rows(path):
                if isinstance(row, BadRow):
                    bad.append(row)
                    continue
                if not row:
                    continue
                try:
                    image, iid, source = image_of(row)
                    if not image:
                        bad.append(BadRow(path.name, i, "no image: needs docker_image, image or instance.instance_id",
                                          unit))
                        continue
                    ref = parse(image)
                except ImagefarmError as exc:
                    bad.append(BadRow(path.name, i, str(exc), unit))
                    continue
                instances.append(Instance(iid or image, ref, split, i, source))
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                               "datasets are parquet, jsonl or text files") from None
        except IsADirectoryError:
            raise DatasetError(f"{path}: is a directory, not a dataset file") from None
        except OSError as exc:
            raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not used:
        raise DatasetError(f"{spec}: no files for split(s) {', '.join(splits or ())}")
    return Catalog(tuple(instances), tuple(bad), tuple(used))
