"""`prepare`: a source -> centre-cropped parquet shards + manifest.

Class sources: synthetic shapes, an image folder (root/<class>/<images>), prepared parquet shards. Captioned
sources (their shards carry a `caption` column; the manifest says `"captioned": true`): synthetic scenes, WebDataset
tar shards and img2dataset parquet (`aligntok.data.webdataset`), and prepared parquet shards of a captioned set.

Bad images (unreadable, truncated, zero-byte, not an image, too small, decompression bombs) are skipped and
listed in the manifest with their reason; they never stop the run. The train/val split is decided by a hash of
each image's stable key, so adding images never moves others between splits.

Work is split into units, one per output shard (`aligntok.data.units`): shard k of a split holds that split's
source items [k*shard_rows, (k+1)*shard_rows) minus the skipped ones. Units run in `workers` processes and are
resumable: after a kill, a rerun keeps every finished shard and builds only the missing ones. The output (shard
bytes, manifest, content hash) is the same for any number of workers and any number of interruptions.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pyarrow.parquet as pq

from aligntok.cpus import usable_cpus
from aligntok.data.images import MIN_SIDE, Skip, center_crop, encode_png, load_image, to_rgb
from aligntok.data.shards import MANIFEST, PROGRESS, ROW_GROUP_ROWS, SPLITS, DataError, publish, read_manifest
from aligntok.data.synthetic import SYNTHETIC_CLASSES
from aligntok.data.units import Unit, build_unit, finished, fingerprint
from aligntok.data.webdataset import img2dataset_items, webdataset_items
from aligntok.progress import progress

SOURCES = ("synthetic", "scenes", "imagefolder", "parquet", "webdataset", "img2dataset")
CAPTIONED = ("scenes", "webdataset", "img2dataset")  # and parquet, when its shards have a caption column
GENERATED = ("synthetic", "scenes")  # drawn, not read: no data.root, no val folder

__all__ = ["DataError", "Skip", "prepare_dataset", "center_crop", "to_rgb", "encode_png", "load_image",
           "resolve_workers"]


def resolve_workers(workers: int | None) -> int:
    """`data.num_workers` for prepare: null = every CPU this process may use; 0 or 1 = in this process."""
    return usable_cpus() if workers is None else max(1, workers)


def split_of(key: str, val_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2 ** 64
    return "val" if h < val_fraction else "train"


# A source is (class_names, items); an item is (key, label, spec): a picklable recipe for its image (units.make).
def _synthetic(num_images: int | None, num_classes: int, seed: int):
    if num_classes > len(SYNTHETIC_CLASSES):
        raise DataError(f"data.num_classes: given {num_classes}; the synthetic source has at most "
                        f"{len(SYNTHETIC_CLASSES)} classes")
    if not num_images:
        raise DataError(f"data.num_images: given {num_images}; the synthetic source needs a positive count")
    items = [(f"synthetic-{i:08d}", i % num_classes, ("synthetic", i, seed)) for i in range(num_images)]
    return SYNTHETIC_CLASSES[:num_classes], items


def _scenes(num_images: int | None, seed: int):
    """Captioned synthetic scenes; an image's label is its scene's shape (`aligntok.data.scenes`)."""
    from aligntok.data.scenes import SCENE_CLASSES, scene_attributes, scene_label

    if not num_images:
        raise DataError(f"data.num_images: given {num_images}; the scenes source needs a positive count")
    items = [(f"scene-{i:08d}", scene_label(scene_attributes(i, seed)), ("scene", i, seed)) for i in range(num_images)]
    return list(SCENE_CLASSES), items


def _imagefolder(root: Path):
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found; expected root/<class>/<image files>")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = [sorted(f.name for f in (root / c).iterdir() if f.is_file() and not f.name.startswith("."))
                 for c in classes]
    if not any(per_class):
        raise DataError(f"{root}: no image files found; expected root/<class>/<image files>")
    # Classes interleaved, so a num_images cap still samples every class (and a row group spans many classes).
    items = [(f"{classes[label]}/{files[k]}", label, ("file", str(root / classes[label] / files[k])))
             for k in range(max(map(len, per_class))) for label, files in enumerate(per_class) if k < len(files)]
    return classes, items


def _parquet(root: Path):
    """Keys and labels from the shards' small columns; image bytes (and captions) are read later, by the unit that
    needs them. Returns (class names, items, captioned)."""
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
    items, names, captioned = [], {}, []
    for path in shards:
        try:
            stat = path.stat()
            with pq.ParquetFile(path) as pf:
                captioned.append("caption" in pf.schema_arrow.names)
                for g in range(pf.metadata.num_row_groups):
                    t = pf.read_row_group(g, columns=["key", "label", "class_name"])
                    for off, (key, label, name) in enumerate(zip(*(t.column(c).to_pylist() for c in t.column_names))):
                        names.setdefault(label, name)
                        items.append((key, label, ("parquet", str(path), g, off, [stat.st_size, stat.st_mtime_ns])))
        except Exception as e:  # noqa: BLE001 - unreadable or wrong columns: one line naming the file
            raise DataError(f"{path}: unreadable parquet shard ({str(e).splitlines()[0][:120]}); expected "
                            f"columns key, image, label, class_name") from None
    if classes is None:
        classes = [names.get(i, str(i)) for i in range(max(names, default=-1) + 1)]
    if not all(c == captioned[0] for c in captioned):
        odd = shards[captioned.index(not captioned[0])]
        raise DataError(f"{odd}: {'a' if captioned[0] is False else 'no'} caption column, unlike {shards[0]}; "
                        f"expected the shards of one data set")
    return classes, items, captioned[0]


def _plan(items, splits, limit, shard_rows, shard_dir: Path, unit_args: dict) -> dict[str, list[Unit]]:
    """The units (output shards) for the first `limit` source items."""
    per_split: dict[str, list] = {s: [] for s in SPLITS}
    for pos in range(limit):
        key, label, spec = items[pos]
        per_split[splits[pos]].append((pos, key, label, spec))
    units: dict[str, list[Unit]] = {}
    for split, chosen in per_split.items():
        units[split] = []
        for k, start in enumerate(range(0, len(chosen), shard_rows)):
            block = tuple(chosen[start:start + shard_rows])
            units[split].append(Unit(file=f"{split}-{k:05d}.parquet", items=block, shard_dir=str(shard_dir),
                                     fingerprint=fingerprint(block, **unit_args), **unit_args))
    return units


def _run(units: list[Unit], workers: int) -> dict[str, dict]:
    """Sidecar records of all units: finished ones as found, the rest built (in `workers` spawned processes)."""
    records = {u.file: rec for u in units if (rec := finished(u)) is not None}
    todo = [u for u in units if u.file not in records]
    if todo:
        print(f"prepare: {len(records)}/{len(units)} shards already done; building {len(todo)} "
              f"with {min(workers, len(todo))} process(es)", flush=True)
    bar = progress(total=len(todo), desc="prepare shards", enabled=bool(todo))
    if workers <= 1 or len(todo) <= 1:
        for u in todo:
            records[u.file] = build_unit(u)
            bar.update(1)
    else:  # spawn: no forked copies of the parent's (torch, threads) state
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=get_context("spawn")) as pool:
            for u, rec in zip(todo, pool.map(build_unit, todo)):
                records[u.file] = rec
                bar.update(1)
    bar.close()
    return records


def _load(source: str, root: Path | None, out_dir: Path, field: str, caption_column: str = "caption"):
    """(class_names, items, captioned) of a folder source; `field` names the setting in errors."""
    if root is None:
        raise DataError(f"{field}: not set; the {source} source needs a directory")
    if not Path(root).exists():
        raise DataError(f"{field}: {root} does not exist; expected the {source} source directory")
    if Path(root).resolve() == out_dir.resolve():
        raise DataError(f"{field}: {root} is the output folder; prepare into another folder")
    if source == "parquet":
        return _parquet(Path(root))
    if source == "webdataset":
        return (*webdataset_items(Path(root)), True)
    if source == "img2dataset":
        return (*img2dataset_items(Path(root), caption_column), True)
    return (*_imagefolder(Path(root)), False)


def _val_items(source: str, val_root: Path, classes, captioned: bool, out_dir: Path, caption_column: str) -> list:
    """The val split from its own folder (e.g. the ImageNet val set in class folders): labels by class name."""
    if source in GENERATED:
        raise DataError(f"data.val_root: the {source} source has no val folder; expected null")
    val_classes, items, val_captioned = _load(source, val_root, out_dir, "data.val_root", caption_column)
    if val_captioned != captioned:
        raise DataError(f"{val_root}: {'captioned' if val_captioned else 'uncaptioned'} images, unlike data.root; "
                        f"expected the same kind of data set")
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in val_classes if c not in index]
    if unknown:
        raise DataError(f"{val_root}: class(es) {', '.join(unknown[:3])} are not among data.root's {len(classes)} "
                        f"classes; expected the same class names")
    return [(f"val:{key}", index[val_classes[label]], spec) for key, label, spec in items]


def prepare_dataset(source: str, out_dir: Path, *, root: Path | None, resolution: int, num_images: int | None,
                    num_classes: int, val_fraction: float, shard_rows: int, seed: int,
                    max_image_pixels: int = 89_478_485, workers: int | None = 1, work_dir: Path | None = None,
                    row_group_rows: int = ROW_GROUP_ROWS, val_root: Path | None = None,
                    caption_column: str = "caption", task: str = "class") -> dict:
    """Prepare `source` into `out_dir` (shards + manifest.json, written last); returns the manifest.

    `workers`: processes (None = every core; 1, the default, = this process). `work_dir`: where shards and
    progress are built and kept for a resume (a stage whose outputs are deleted before it runs passes one outside
    them); shards are then hard-linked into `out_dir`. Without it they are built in `out_dir` and the progress
    files removed at the end.
    With `num_images`, the first `num_images` usable images of the source are kept (skipped ones are topped up).
    With `val_root` (same kind of source, same class names), the val split is every image of that folder and
    `val_fraction` must be 0; `num_images` then caps the train split only.
    `caption_column`: the img2dataset source's caption column. `task` "text" refuses a source without captions.
    """
    if source not in SOURCES:
        raise DataError(f"data.source: given {source!r}; expected one of {', '.join(SOURCES)}")
    if resolution < MIN_SIDE:
        raise DataError(f"data.resolution: given {resolution}; expected >= {MIN_SIDE}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction: given {val_fraction}; expected 0 <= val_fraction < 1")
    if val_root is not None and val_fraction:
        raise DataError(f"data.val_fraction: given {val_fraction} with data.val_root set; expected 0 (the val "
                        f"split is data.val_root)")
    if shard_rows < 1:
        raise DataError(f"data.shard_rows: given {shard_rows}; expected >= 1")
    if num_images is not None and num_images < 0:
        raise DataError(f"data.num_images: given {num_images}; expected a positive count or null for all")
    out_dir = Path(out_dir)
    if source == "synthetic":
        classes, items, captioned = *_synthetic(num_images, num_classes, seed), False
    elif source == "scenes":
        classes, items, captioned = *_scenes(num_images, seed), True
    else:
        classes, items, captioned = _load(source, root, out_dir, "data.root", caption_column)
    if task == "text" and not captioned:
        raise DataError(f"data.root: {root} holds no captions (a class data set); expected a captioned source for "
                        f"task text (scenes, webdataset, img2dataset, or parquet prepared from one)")
    val_items = (_val_items(source, Path(val_root), classes, captioned, out_dir, caption_column)
                 if val_root is not None else [])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # a run that dies midway leaves no manifest over mixed shards
    shard_dir = Path(work_dir) if work_dir is not None else out_dir
    (shard_dir / PROGRESS).mkdir(parents=True, exist_ok=True)

    # val_root's items come first and are always all kept; the cap counts data.root's images
    splits = ["val"] * len(val_items) + [split_of(key, val_fraction) for key, _, _ in items]
    first, items = len(val_items), val_items + items
    unit_args = {"resolution": resolution, "max_pixels": max_image_pixels, "class_names": tuple(classes),
                 "row_group_rows": row_group_rows, "captioned": captioned}
    limit = len(items) if num_images is None else min(first + num_images, len(items))
    while True:  # with a cap, add as many items as were skipped until the cap or the source runs out
        units = _plan(items, splits, limit, shard_rows, shard_dir, unit_args)
        records = _run([u for split in SPLITS for u in units[split]], resolve_workers(workers))
        from_val_root = sum(records[u.file]["rows"] for u in units["val"]) if val_items else 0
        kept = sum(r["rows"] for r in records.values()) - from_val_root
        if num_images is None or kept >= num_images or limit >= len(items):
            break
        limit = min(len(items), limit + num_images - kept)
    if not kept:
        where = root if root is not None else source
        skipped = sum(len(r["skipped"]) for r in records.values())
        raise DataError(f"{where}: no usable images ({skipped} skipped); expected at least one valid image")
    return publish(source, root, out_dir, shard_dir, units, records, classes, seed, val_fraction, shard_rows,
                   row_group_rows, resolution, val_root, captioned)
