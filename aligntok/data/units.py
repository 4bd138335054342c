"""`prepare`'s unit of work and of resume: one output shard, built by one (possibly separate) process.

A unit is a contiguous run of one split's source items. Its worker converts each item (`make`), streams the
kept rows into the shard row group by row group, and then writes a small sidecar (`.progress/<shard>.json`)
holding the unit's fingerprint (what it was built from), the shard's size and per-row digests, its class counts
and skips. The shard is published atomically before its sidecar, so a sidecar means a finished shard; a rerun
after a kill keeps every unit whose sidecar matches and rebuilds only the rest. The output of a unit depends on
nothing but its items, so one process and many give the same bytes.

Everything here is top-level and picklable, and imports no torch: spawned workers start light.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from aligntok.data.images import Skip, encode_png, image_png, pil_guard
from aligntok.data.shards import DataError, ShardWriter
from aligntok.data.synthetic import synthetic_image
from aligntok.io import write_json_atomic

PROGRESS = ".progress"
FORMAT = 2  # bump when a unit's output bytes change for the same items


@dataclass(frozen=True)
class Unit:
    file: str                   # output shard name, e.g. train-00003.parquet
    items: tuple                # ((input position, key, label, spec), ...) in source order
    resolution: int
    max_pixels: int
    class_names: tuple
    row_group_rows: int
    shard_dir: str
    fingerprint: str


def fingerprint(items, resolution: int, max_pixels: int, class_names, row_group_rows: int) -> str:
    """What a unit's shard is a function of (positions excluded: they only order the manifest's skip list)."""
    blob = json.dumps([FORMAT, resolution, max_pixels, list(class_names), row_group_rows,
                       [[k, y, list(s)] for _, k, y, s in items]], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def row_digest(key: str, label: int, png: bytes) -> str:
    """A row's identity for the content hash: sha256 over its length-prefixed key, label and image bytes."""
    k = key.encode()
    h = hashlib.sha256(struct.pack("<Q", len(k)) + k + struct.pack("<qQ", label, len(png)))
    h.update(png)
    return h.hexdigest()


def sidecar_path(shard_dir: Path, file: str) -> Path:
    return Path(shard_dir) / PROGRESS / f"{file}.json"


class _SourceRows:
    """Image bytes of parquet-source rows, one source row group cached (a unit reads its rows in order)."""

    def __init__(self):
        self.key, self.table = None, None

    def image(self, path: str, group: int, offset: int) -> bytes | None:
        if self.key != (path, group):
            try:
                with pq.ParquetFile(path) as pf:
                    self.table = pf.read_row_group(group, columns=["image"])
            except Exception as e:  # noqa: BLE001 - any failure to read the source is the same one-line error
                raise DataError(f"{path}: unreadable parquet source ({str(e).splitlines()[0][:120]})") from None
            self.key = (path, group)
        return self.table.column("image")[offset].as_py()


def make(spec: tuple, label: int, unit: Unit, source: _SourceRows) -> bytes:
    """One item's prepared PNG bytes, or Skip. `spec` says where the image comes from (see sources.py)."""
    kind = spec[0]
    if kind == "synthetic":
        _, index, seed = spec
        return encode_png(synthetic_image(index, label, unit.resolution, seed))
    if kind == "file":
        try:
            data = Path(spec[1]).read_bytes()
        except OSError as e:
            raise Skip(f"unreadable file ({e.strerror or type(e).__name__})") from None
        return image_png(data, unit.resolution, unit.max_pixels)
    if kind == "parquet":
        if not 0 <= label < len(unit.class_names):
            raise Skip(f"label {label} out of range [0, {len(unit.class_names)})")
        _, path, group, offset, _stamp = spec
        return image_png(source.image(path, group, offset) or b"", unit.resolution, unit.max_pixels,
                         passthrough=True)
    raise ValueError(f"unknown item kind {kind!r}")


def build_unit(unit: Unit) -> dict:
    """Convert a unit's items into its shard, then write its sidecar; returns the sidecar record."""
    digests, skipped, counts = [], [], [0] * len(unit.class_names)
    shard = Path(unit.shard_dir) / unit.file
    source = _SourceRows()
    with pil_guard(unit.max_pixels), ShardWriter(shard, unit.row_group_rows) as writer:
        for pos, key, label, spec in unit.items:
            try:
                png = make(spec, label, unit, source)
            except Skip as e:
                skipped.append([pos, key, str(e)])
                continue
            writer.add({"key": key, "image": png, "label": label, "class_name": unit.class_names[label]})
            digests.append(row_digest(key, label, png))
            counts[label] += 1
    record = {"fingerprint": unit.fingerprint, "file": unit.file, "rows": len(digests),
              "size": shard.stat().st_size, "digests": digests, "label_counts": counts, "skipped": skipped}
    write_json_atomic(sidecar_path(unit.shard_dir, unit.file), record)
    return record


def finished(unit: Unit) -> dict | None:
    """The sidecar record of a unit finished by an earlier run, if it and its shard still match; else None."""
    path = sidecar_path(unit.shard_dir, unit.file)
    shard = Path(unit.shard_dir) / unit.file
    try:
        record = json.loads(path.read_text())
        ok = (record["fingerprint"] == unit.fingerprint and shard.stat().st_size == record["size"]
              and len(record["digests"]) == record["rows"] == pq.read_metadata(shard).num_rows)
    except Exception:  # noqa: BLE001 - missing, torn or foreign files all mean: build it again
        return None
    return record if ok else None
