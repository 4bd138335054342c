"""Parquet shards (key, PNG image bytes, label, class name) and the data set's manifest.json.

A shard is written in row groups of `ROW_GROUP_ROWS` rows: the row group is parquet's unit of reading, so it is
the reader's unit of random access and of memory (see `aligntok.data.reader`). 32 rows are ~4 MB of 256 px PNGs
(~0.3 MB at 64 px): small enough that a few cached row groups per process cost little, large enough that the
footer stays small and a sequential pass reads in MB-sized pieces.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from aligntok.io import write_error

SCHEMA = pa.schema([("key", pa.string()), ("image", pa.binary()), ("label", pa.int64()),
                    ("class_name", pa.string())])
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
ROW_GROUP_ROWS = 32


class DataError(ValueError):
    """A data-set problem, reported in one line naming the file and what was expected."""


class ShardWriter:
    """Streams rows into one shard, a row group at a time (memory: one row group), published atomically on close.

    Rows go to a temp file in the same directory, renamed over `path` only when the writer closes cleanly, so a
    killed writer never leaves a shard that looks complete; a failed write (a full disk) removes the temp file and
    raises WriteError naming the shard.
    """

    def __init__(self, path: Path, row_group_rows: int = ROW_GROUP_ROWS):
        self.path, self.row_group_rows = Path(path), row_group_rows
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        # PNG bytes neither compress nor repeat: no compression, and dictionaries and statistics only for the
        # small columns (a dictionary over the image column would only be built to be thrown away)
        try:
            self._writer = pq.ParquetWriter(self.tmp, SCHEMA, compression="none",
                                            use_dictionary=["label", "class_name"], write_statistics=["key", "label"])
        except OSError as e:
            self.tmp.unlink(missing_ok=True)
            raise write_error(self.path, e) from None
        self._pending: list[dict] = []
        self.rows = 0

    def add(self, row: dict) -> None:
        self._pending.append(row)
        if len(self._pending) >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            try:
                self._writer.write_table(pa.Table.from_pylist(self._pending, schema=SCHEMA))
            except OSError as e:
                raise write_error(self.path, e) from None
            self.rows += len(self._pending)
            self._pending = []

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, *exc) -> None:
        try:
            if kind is None:
                self._flush()
                try:
                    self._writer.close()
                    os.replace(self.tmp, self.path)
                except OSError as e:
                    raise write_error(self.path, e) from None
        finally:
            try:
                self._writer.close()  # a no-op once closed
            except OSError:
                pass  # already failing (closing on a full disk fails too): the first error is the one reported
            self.tmp.unlink(missing_ok=True)


def write_shard(path: Path, rows: list[dict], row_group_rows: int = ROW_GROUP_ROWS) -> None:
    """Write rows atomically in row groups of `row_group_rows`."""
    with ShardWriter(path, row_group_rows) as writer:
        for row in rows:
            writer.add(row)


def open_shard(path: Path) -> pq.ParquetFile:
    """Open a shard's footer (no row data) and check its columns; one-line DataError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: shard not found; re-run `aligntok prepare`")
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: unreadable parquet shard ({str(e).splitlines()[0][:120]})") from None
    missing = [f.name for f in SCHEMA if f.name not in pf.schema_arrow.names]
    if missing:
        pf.close()
        raise DataError(f"{path}: shard lacks column(s) {missing}; expected key, image, label, class_name")
    return pf


def read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A whole shard (or some of its columns) in memory: for small shards and metadata columns only."""
    pf = open_shard(path)
    try:
        return pf.read(columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: unreadable parquet shard ({str(e).splitlines()[0][:120]})") from None
    finally:
        pf.close()


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
