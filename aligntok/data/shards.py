"""Parquet shards (key, PNG image bytes, label, class name; a caption too for captioned sources) and the data
set's manifest.json.

A shard is written in row groups of `ROW_GROUP_ROWS` rows: the row group is parquet's unit of reading, so it is
the reader's unit of random access and of memory (see `aligntok.data.reader`). 32 rows are ~4 MB of 256 px PNGs
(~0.3 MB at 64 px): small enough that a few cached row groups per process cost little, large enough that the
footer stays small and a sequential pass reads in MB-sized pieces.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from aligntok.io import write_error, write_json_atomic

SCHEMA = pa.schema([("key", pa.string()), ("image", pa.binary()), ("label", pa.int64()),
                    ("class_name", pa.string())])
# captioned sources (scenes, webdataset, img2dataset): the same columns and each image's caption, last
CAPTION_SCHEMA = SCHEMA.append(pa.field("caption", pa.string()))
MANIFEST = "manifest.json"
PROGRESS = ".progress"  # prepare's per-shard sidecars (aligntok.data.units), beside the shards
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

    def __init__(self, path: Path, row_group_rows: int = ROW_GROUP_ROWS, schema: pa.Schema = SCHEMA):
        self.path, self.row_group_rows, self.schema = Path(path), row_group_rows, schema
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        # PNG bytes neither compress nor repeat: no compression, and dictionaries and statistics only for the
        # small columns (a dictionary over the image column would only be built to be thrown away)
        try:
            self._writer = pq.ParquetWriter(self.tmp, schema, compression="none",
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
                self._writer.write_table(pa.Table.from_pylist(self._pending, schema=self.schema))
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


def write_shard(path: Path, rows: list[dict], row_group_rows: int = ROW_GROUP_ROWS,
                schema: pa.Schema = SCHEMA) -> None:
    """Write rows atomically in row groups of `row_group_rows`."""
    with ShardWriter(path, row_group_rows, schema) as writer:
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


# -- publishing a prepared data set (aligntok.data.sources) ------------------------------------------------------
def _remove_stale(folder: Path, keep: set[str]) -> None:
    for stale in [*folder.glob("*.parquet"), *folder.glob(".*.parquet.*.tmp")]:
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    for side in (folder / PROGRESS).glob("*.json*"):
        if side.name.startswith(".") or side.name[:-len(".json")] not in keep:  # torn temp files, old shards
            side.unlink(missing_ok=True)


def publish(source, root, out_dir: Path, shard_dir: Path, units, records, classes, seed, val_fraction,
            shard_rows, row_group_rows, resolution, val_root, captioned) -> dict:
    """Drop stale files, publish the shards in `out_dir`, then write the manifest (last); returns it.

    `units`: {split: [unit]} (each with `.file`), `records`: each unit's sidecar record by file."""
    shards = {s: [{"file": u.file, "rows": records[u.file]["rows"]} for u in units[s]] for s in SPLITS}
    keep = {u.file for s in SPLITS for u in units[s]}
    _remove_stale(shard_dir, keep)
    if shard_dir != out_dir:
        _remove_stale(out_dir, keep)
        for name in sorted(keep):
            _link(shard_dir / name, out_dir / name)
    else:
        shutil.rmtree(shard_dir / PROGRESS, ignore_errors=True)
    counts, digests = {}, {}
    for s in SPLITS:
        totals = [sum(records[u.file]["label_counts"][c] for u in units[s]) for c in range(len(classes))]
        counts[s] = dict(zip(classes, totals))
        digests[s] = hashlib.sha256(b"".join(bytes.fromhex(d) for u in units[s]
                                             for d in records[u.file]["digests"])).digest()
    skipped = sorted(x for r in records.values() for x in r["skipped"])
    content = hashlib.sha256(b"".join(digests[s] for s in SPLITS)).hexdigest()
    manifest = {"version": 2, "source": source, "root": str(root) if root is not None else None,
                "val_root": str(val_root) if val_root is not None else None,
                "resolution": resolution, "num_classes": len(classes), "class_names": list(classes), "seed": seed,
                "val_fraction": val_fraction, "shard_rows": shard_rows, "row_group_rows": row_group_rows,
                "image_format": "png", "captioned": captioned,
                "num_images": {s: sum(counts[s].values()) for s in SPLITS}, "counts": counts, "shards": shards,
                "skipped": [{"path": key, "reason": reason} for _, key, reason in skipped], "content_hash": content}
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def _link(src: Path, dst: Path) -> None:
    """Hard-link a finished shard into the output folder (a copy across file systems)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
