"""Parquet shards (key, PNG image bytes, label, class name) and the data set's manifest.json."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([("key", pa.string()), ("image", pa.binary()), ("label", pa.int64()),
                    ("class_name", pa.string())])
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


class DataError(ValueError):
    """A data-set problem, reported in one line naming the file and what was expected."""


def write_shard(path: Path, rows: list[dict]) -> None:
    """Write rows atomically: a temp file in the same directory, then rename."""
    path = Path(path)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, compression="none")  # PNG bytes do not compress further
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_shard(path: Path) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: shard not found; re-run `aligntok prepare`")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: unreadable parquet shard ({str(e).splitlines()[0][:120]})") from None
    missing = [f.name for f in SCHEMA if f.name not in table.column_names]
    if missing:
        raise DataError(f"{path}: shard lacks column(s) {missing}; expected key, image, label, class_name")
    return table


def read_manifest(data_dir: Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; run `aligntok prepare` first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise DataError(f"{path}: manifest is not valid JSON ({getattr(e, 'msg', e)}{where})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: manifest is not a JSON object; re-run `aligntok prepare`")
    for key in ("shards", "class_names", "num_classes", "resolution", "counts", "content_hash"):
        if key not in manifest:
            raise DataError(f"{path}: manifest lacks '{key}'; re-run `aligntok prepare`")
    if not all(isinstance(manifest["shards"].get(s), list) for s in SPLITS):
        raise DataError(f"{path}: manifest 'shards' needs 'train' and 'val' lists; re-run `aligntok prepare`")
    return manifest
