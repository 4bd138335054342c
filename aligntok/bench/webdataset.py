"""The WebDataset reader's throughput: images/s of `prepare` over img2dataset-style tar shards (key.jpg + key.txt
+ key.json), with N worker processes, on synthetic photos written to a temporary folder.

Three figures: the planning pass alone (tar headers walked, no image bytes read), the whole prepare (planning,
then each unit reading its members by offset, decoding, centre-cropping and writing its shard), and, as its
single-core bound, decode + centre-crop + PNG encode of the same JPEG bytes already in memory, in this process."""
from __future__ import annotations

import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

from aligntok.data.images import encode_png, load_image
from aligntok.data.sources import prepare_dataset
from aligntok.data.synthetic import SYNTHETIC_CLASSES, synthetic_image
from aligntok.data.webdataset import webdataset_items

PHOTO = (500, 375)       # a typical web photo, as in bench prepare
SAMPLES_PER_TAR = 100    # img2dataset writes 10,000; smaller here so a few hundred images still make several tars


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_tars(root: Path, images: int, per_tar: int = SAMPLES_PER_TAR) -> list[Path]:
    """`images` samples in tar shards of `per_tar`: a JPEG photo, its caption and img2dataset-like metadata."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for t, start in enumerate(range(0, images, per_tar)):
        path = root / f"{t:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(images, start + per_tar)):
                label = i % len(SYNTHETIC_CLASSES)
                img = synthetic_image(i, label, PHOTO[1], seed=1234).resize(PHOTO, Image.Resampling.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                key = f"{t:05d}{i - start:04d}"
                _add(tar, f"{key}.jpg", buf.getvalue())
                _add(tar, f"{key}.txt", f"a photo of a {SYNTHETIC_CLASSES[label]}, number {i}".encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "status": "success", "width": PHOTO[0],
                                                     "height": PHOTO[1]}).encode())
        paths.append(path)
    return paths


def _decode_rate(tar_path: Path, resolution: int, limit: int = 64) -> float:
    """images/s of decode + crop + encode over the first `limit` JPEGs of a tar, bytes already in memory."""
    with tarfile.open(tar_path) as tar:
        datas = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")][:limit]
    t = time.perf_counter()
    for d in datas:
        encode_png(load_image(d, resolution, 89_478_485))
    return len(datas) / (time.perf_counter() - t)


def bench_webdataset(workers: int = 1, images: int = 256, resolution: int = 64,
                     folder: Path | None = None) -> dict:
    """images/s of prepare over synthetic WebDataset shards with `workers` processes (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="bench-webdataset-") as tmp:
        base = Path(folder) if folder is not None else Path(tmp)
        src = base / "tars"
        tars = write_tars(src, images)
        size = sum(p.stat().st_size for p in tars)
        for p in tars:  # warm the page cache: every figure below reads from memory, not from a cold disk
            p.read_bytes()
        t = time.perf_counter()
        _, items = webdataset_items(src)
        plan_s = time.perf_counter() - t
        # ~4 shards (units of work) per worker, so every process stays busy
        t = time.perf_counter()
        manifest = prepare_dataset("webdataset", base / f"out-w{workers}", root=src, resolution=resolution,
                                   num_images=None, num_classes=1, val_fraction=0.0,
                                   shard_rows=max(8, images // (4 * max(1, workers))), seed=0, workers=workers)
        seconds = time.perf_counter() - t
        decode = _decode_rate(tars[0], resolution)
    kept = manifest["num_images"]["train"]
    return {"workers": workers, "images": kept, "resolution": resolution, "tars": len(tars),
            "tar_mb": round(size / 2 ** 20, 2), "plan_s": round(plan_s, 4),
            "plan_samples_per_s": round(len(items) / plan_s, 1), "seconds": round(seconds, 3),
            "img_per_s": round(kept / seconds, 1), "decode_img_per_s_1core": round(decode, 1)}
