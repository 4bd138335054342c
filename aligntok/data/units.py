"""`prepare`'s unit of work and of resume: one output shard, built by one (possibly separate) process.

A unit is a contiguous run of one split's source items. Its worker converts each item (`make`), streams the
kept rows (with each image's caption, for a captioned source) into the shard row group by row group, and then
writes a small sidecar (`.progress/<shard>.json`) holding the unit's fingerprint (what it was built from), the
shard's size and per-row digests, its class counts and skips. The shard is published atomically before its
sidecar, so a sidecar means a finished shard; a rerun after a kill keeps every unit whose sidecar matches and
rebuilds only the rest. The output of a unit depends on nothing but its items, so one process and many give the
same bytes.

Everything here is top-level and picklable, and imports no torch: spawned workers start light.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from aligntok.data.images import Skip, center_crop, encode_png, image_png, pil_guard, to_rgb
from aligntok.data.shards import CAPTION_SCHEMA, PROGRESS, SCHEMA, DataError, ShardWriter
from aligntok.data.synthetic import synthetic_image
from aligntok.data.webdataset import TarMembers, caption_text
from aligntok.io import write_json_atomic

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
    captioned: bool = False     # rows carry a caption column (CAPTION_SCHEMA)


def fingerprint(items, resolution: int, max_pixels: int, class_names, row_group_rows: int,
                captioned: bool = False) -> str:
    """What a unit's shard is a function of (positions excluded: they only order the manifest's skip list)."""
    head = [FORMAT, resolution, max_pixels, list(class_names), row_group_rows] + (["captioned"] if captioned else [])
    blob = json.dumps([*head, [[k, y, list(s)] for _, k, y, s in items]], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def row_digest(key: str, label: int, png: bytes, caption: str | None = None) -> str:
    """A row's identity for the content hash: sha256 over its length-prefixed key, label and image bytes (and
    caption, for a captioned row)."""
    k = key.encode()
    h = hashlib.sha256(struct.pack("<Q", len(k)) + k + struct.pack("<qQ", label, len(png)))
    h.update(png)
    if caption is not None:
        c = caption.encode()
        h.update(struct.pack("<Q", len(c)) + c)
    return h.hexdigest()


def sidecar_path(shard_dir: Path, file: str) -> Path:
    return Path(shard_dir) / PROGRESS / f"{file}.json"


class _Sources:
    """A unit's open inputs, read in source order: one parquet row group (just the columns asked for) and one tar
    file at a time."""

    def __init__(self):
        self.key, self.table = None, None
        self.tar = TarMembers()

    def row(self, path: str, group: int, offset: int, columns: tuple[str, ...]) -> list:
        if self.key != (path, group, columns):
            self.table = None
            try:
                with pq.ParquetFile(path) as pf:
                    self.table = pf.read_row_group(group, columns=list(columns))
            except Exception as e:  # noqa: BLE001 - any failure to read the source is the same one-line error
                raise DataError(f"{path}: unreadable parquet source ({str(e).splitlines()[0][:120]})") from None
            self.key = (path, group, columns)
        return [self.table.column(c)[offset].as_py() for c in columns]

    def close(self) -> None:
        self.key, self.table = None, None
        self.tar.close()


def make(spec: tuple, label: int, unit: Unit, source: _Sources) -> tuple[bytes, str | None]:
    """One item's prepared PNG bytes and caption (None for a class source), or Skip. `spec` says where the image
    comes from (see sources.py and webdataset.py)."""
    kind = spec[0]
    if kind == "synthetic":
        _, index, seed = spec
        return encode_png(synthetic_image(index, label, unit.resolution, seed)), None
    if kind == "file":
        try:
            data = Path(spec[1]).read_bytes()
        except OSError as e:
            raise Skip(f"unreadable file ({e.strerror or type(e).__name__})") from None
        return image_png(data, unit.resolution, unit.max_pixels), None
    if kind == "parquet":
        if not 0 <= label < len(unit.class_names):
            raise Skip(f"label {label} out of range [0, {len(unit.class_names)})")
        _, path, group, offset, _stamp = spec
        data, *caption = source.row(path, group, offset, ("image", "caption") if unit.captioned else ("image",))
        png = image_png(data or b"", unit.resolution, unit.max_pixels, passthrough=True)
        return png, caption_text(caption[0]) if unit.captioned else None
    if kind == "scene":
        from aligntok.data.scenes import draw_scene  # imported where used: class-path workers stay light

        _, index, seed = spec
        img, caption = draw_scene(index, unit.resolution, seed)
        img = to_rgb(img)
        if img.size != (unit.resolution, unit.resolution):
            img = center_crop(img, unit.resolution)
        return encode_png(img), caption
    if kind == "tar":
        _, path, image_at, image_size, caption_at, caption_size, _stamp = spec
        data = source.tar.read(path, image_at, image_size)
        caption = caption_text(source.tar.read(path, caption_at, caption_size))
        return image_png(data, unit.resolution, unit.max_pixels), caption
    if kind == "img2dataset":
        _, path, group, offset, image_column, caption_column, _stamp = spec
        data, caption = source.row(path, group, offset, (image_column, caption_column))
        if not data:
            raise Skip(f"no image bytes (column {image_column} is {'null' if data is None else 'empty'})")
        return image_png(data, unit.resolution, unit.max_pixels), caption_text(caption)
    if kind == "skip":  # found bad while planning (a caption-less key, a damaged tar, a failed download)
        raise Skip(spec[1])
    raise ValueError(f"unknown item kind {kind!r}")


def build_unit(unit: Unit) -> dict:
    """Convert a unit's items into its shard, then write its sidecar; returns the sidecar record."""
    digests, skipped, counts = [], [], [0] * len(unit.class_names)
    shard = Path(unit.shard_dir) / unit.file
    source = _Sources()
    schema = CAPTION_SCHEMA if unit.captioned else SCHEMA
    try:
        with pil_guard(unit.max_pixels), ShardWriter(shard, unit.row_group_rows, schema) as writer:
            for pos, key, label, spec in unit.items:
                try:
                    png, caption = make(spec, label, unit, source)
                except Skip as e:
                    skipped.append([pos, key, str(e)])
                    continue
                row = {"key": key, "image": png, "label": label, "class_name": unit.class_names[label]}
                if unit.captioned:
                    row["caption"] = caption
                writer.add(row)
                digests.append(row_digest(key, label, png, caption if unit.captioned else None))
                counts[label] += 1
    finally:
        source.close()
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
