"""`prepare`: a source (synthetic, image folder, parquet shards) -> centre-cropped parquet shards + manifest.

Bad images (unreadable, truncated, zero-byte, not an image, too small, decompression bombs) are skipped and
listed in the manifest with their reason; they never stop the run. The train/val split is decided by a hash of
each image's stable key, so adding images never moves others between splits.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import struct
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageFile

from aligntok.data.shards import MANIFEST, SPLITS, DataError, read_manifest, read_shard, write_shard
from aligntok.data.synthetic import SYNTHETIC_CLASSES, synthetic_image
from aligntok.io import write_json_atomic

MIN_SIDE = 8
SOURCES = ("synthetic", "imagefolder", "parquet")
_MAGIC = [(b"\xff\xd8\xff", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"), (b"RIFF", "WebP"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF")]

__all__ = ["DataError", "prepare_dataset", "center_crop", "to_rgb", "encode_png", "load_image"]


class Skip(Exception):
    """An input that cannot become a training image; the message is the manifest's short reason."""


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop: halve with BOX while the short side is >= 2*size, BICUBIC to size, crop the centre."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, CMYK, palette and alpha images to RGB (transparency composited on white)."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if arr.max(initial=0) > 255:
            arr = arr / 257  # 16-bit samples
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
    return img.convert("RGB")


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def load_image(data: bytes, resolution: int, max_pixels: int) -> Image.Image:
    """Decode fully (so truncation shows), convert to RGB, centre-crop. Raises Skip with a short reason."""
    if not data:
        raise Skip("zero-byte file")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise Image.DecompressionBombError
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Skip(f"too large (over {max_pixels} pixels; decompression-bomb guard)") from None
    except Image.UnidentifiedImageError:
        fmt = next((name for magic, name in _MAGIC if data.startswith(magic)), None)
        raise Skip(f"corrupt (a {fmt} signature, but PIL cannot decode it)" if fmt else "not an image") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error) on bad data
        raise Skip(f"unreadable or truncated ({(str(e).splitlines() or [type(e).__name__])[0][:80]})") from None
    if min(img.size) < MIN_SIDE:
        raise Skip(f"too small ({img.width}x{img.height}, need >= {MIN_SIDE} px)")
    try:
        return center_crop(to_rgb(img), resolution)
    except Exception as e:
        raise Skip(f"unsupported image ({img.mode}: {type(e).__name__})") from None


def _image_png(data: bytes, resolution: int, max_pixels: int, passthrough: bool = False) -> bytes:
    img = load_image(data, resolution, max_pixels)
    if passthrough and data[:8] == b"\x89PNG\r\n\x1a\n":
        with Image.open(io.BytesIO(data)) as src:
            if src.mode == "RGB" and src.size == (resolution, resolution):
                return data  # already prepared: keep the exact bytes so re-sharding keeps the content hash
    return encode_png(img)


@contextlib.contextmanager
def _pil_guard(max_pixels: int):
    """PIL's bomb check at our limit, its warning as an error, truncated files as errors, for one run."""
    old = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_pixels, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old


def _ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn over items in threads (PIL releases the GIL while decoding, resizing and encoding), results in order."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 4 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def split_of(key: str, val_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2 ** 64
    return "val" if h < val_fraction else "train"


# A source is (class_names, items); an item is (key, label, make) where make() -> PNG bytes or raises Skip.
def _synthetic(resolution: int, num_images: int | None, num_classes: int, seed: int):
    if num_classes > len(SYNTHETIC_CLASSES):
        raise DataError(f"data.num_classes: given {num_classes}; the synthetic source has at most "
                        f"{len(SYNTHETIC_CLASSES)} classes")
    if not num_images:
        raise DataError(f"data.num_images: given {num_images}; the synthetic source needs a positive count")

    def make(i: int) -> Callable[[], bytes]:
        return lambda: encode_png(synthetic_image(i, i % num_classes, resolution, seed))
    return SYNTHETIC_CLASSES[:num_classes], ((f"synthetic-{i:08d}", i % num_classes, make(i))
                                            for i in range(num_images))


def _imagefolder(root: Path, resolution: int, max_pixels: int):
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found; expected root/<class>/<image files>")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = [sorted(f for f in (root / c).iterdir() if f.is_file() and not f.name.startswith("."))
                 for c in classes]
    if not any(per_class):
        raise DataError(f"{root}: no image files found; expected root/<class>/<image files>")
    # Classes interleaved, so a num_images cap still samples every class.
    order = [(label, files[k]) for k in range(max(map(len, per_class))) for label, files in enumerate(per_class)
             if k < len(files)]

    def make(path: Path) -> Callable[[], bytes]:
        def read() -> bytes:
            try:
                data = path.read_bytes()
            except OSError as e:
                raise Skip(f"unreadable file ({e.strerror or type(e).__name__})") from None
            return _image_png(data, resolution, max_pixels)
        return read
    return classes, ((f"{classes[label]}/{f.name}", label, make(f)) for label, f in order)


def _parquet(root: Path, resolution: int, max_pixels: int):
    if root.is_file():
        shards, classes = [root], None
    elif (root / MANIFEST).exists():
        manifest = read_manifest(root)
        classes = list(manifest["class_names"])
        shards = [root / s["file"] for split in SPLITS for s in manifest["shards"][split]]
    else:
        shards, classes = sorted(root.glob("*.parquet")), None
    if not shards:
        raise DataError(f"{root}: no parquet shards found; expected a prepared data folder or *.parquet files")
    # Read everything up front: the output folder may be the source folder.
    rows = []
    for s in shards:
        t = read_shard(s)
        rows += zip(*(t.column(c).to_pylist() for c in ("key", "image", "label", "class_name")))
    if classes is None:
        names = {label: name for _, _, label, name in rows}
        classes = [names.get(i, str(i)) for i in range(max(names, default=-1) + 1)]

    def make(data: bytes, label: int) -> Callable[[], bytes]:
        def convert() -> bytes:
            if not 0 <= label < len(classes):
                raise Skip(f"label {label} out of range [0, {len(classes)})")
            return _image_png(data or b"", resolution, max_pixels, passthrough=True)
        return convert
    return classes, ((key, label, make(data, label)) for key, data, label, _ in rows)


def _row_digest(key: str, label: int, png: bytes) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<qQ", label, len(png)) + png


def prepare_dataset(source: str, out_dir: Path, *, root: Path | None, resolution: int, num_images: int | None,
                    num_classes: int, val_fraction: float, shard_rows: int, seed: int,
                    max_image_pixels: int = 89_478_485, workers: int | None = None) -> dict:
    """Prepare `source` into `out_dir` (shards + manifest.json, written last); returns the manifest."""
    if source not in SOURCES:
        raise DataError(f"data.source: given {source!r}; expected one of {', '.join(SOURCES)}")
    if resolution < MIN_SIDE:
        raise DataError(f"data.resolution: given {resolution}; expected >= {MIN_SIDE}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction: given {val_fraction}; expected 0 <= val_fraction < 1")
    if shard_rows < 1:
        raise DataError(f"data.shard_rows: given {shard_rows}; expected >= 1")
    if num_images is not None and num_images < 0:
        raise DataError(f"data.num_images: given {num_images}; expected a positive count or null for all")
    if source == "synthetic":
        classes, items = _synthetic(resolution, num_images, num_classes, seed)
    else:
        if root is None:
            raise DataError(f"data.root: not set; the {source} source needs a directory")
        if not Path(root).exists():
            raise DataError(f"data.root: {root} does not exist; expected the {source} source directory")
        opener = _imagefolder if source == "imagefolder" else _parquet
        classes, items = opener(Path(root), resolution, max_image_pixels)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # a run that dies midway leaves no manifest over mixed shards

    pending: dict[str, list] = {s: [] for s in SPLITS}
    shards: dict[str, list] = {s: [] for s in SPLITS}
    counts = {s: {c: 0 for c in classes} for s in SPLITS}
    hashers = {s: hashlib.sha256() for s in SPLITS}
    skipped = []

    def flush(split: str) -> None:
        name = f"{split}-{len(shards[split]):05d}.parquet"
        write_shard(out_dir / name, pending[split])
        shards[split].append({"file": name, "rows": len(pending[split])})
        pending[split] = []

    def work(item):
        key, label, make = item
        try:
            return key, label, make()
        except Skip as e:
            return key, label, e

    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    kept = 0
    with _pil_guard(max_image_pixels), contextlib.closing(_ordered_map(work, items, workers)) as results:
        for key, label, png in results:
            if isinstance(png, Skip):
                skipped.append({"path": key, "reason": str(png)})
                continue
            split = split_of(key, val_fraction)
            pending[split].append({"key": key, "image": png, "label": label, "class_name": classes[label]})
            hashers[split].update(_row_digest(key, label, png))
            counts[split][classes[label]] += 1
            if len(pending[split]) >= shard_rows:
                flush(split)
            kept += 1
            if num_images and kept >= num_images:
                break
    for split in SPLITS:
        if pending[split]:
            flush(split)
    if not kept:
        where = root if root is not None else source
        raise DataError(f"{where}: no usable images ({len(skipped)} skipped); expected at least one valid image")
    keep = {s["file"] for split in shards.values() for s in split}
    for stale in [*out_dir.glob("*.parquet"), *out_dir.glob(".*.parquet.*.tmp")]:
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    content = hashlib.sha256(b"".join(hashers[s].digest() for s in SPLITS)).hexdigest()
    manifest = {"version": 1, "source": source, "root": str(root) if root is not None else None,
                "resolution": resolution, "num_classes": len(classes), "class_names": list(classes), "seed": seed,
                "val_fraction": val_fraction, "shard_rows": shard_rows, "image_format": "png",
                "num_images": {s: sum(counts[s].values()) for s in SPLITS}, "counts": counts, "shards": shards,
                "skipped": skipped, "content_hash": content}
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest
