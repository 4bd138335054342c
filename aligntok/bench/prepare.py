"""`aligntok bench prepare`: images/s of prepare (synthetic and a JPEG image folder) and of a DataLoader over the
shards, against the single-core PIL decode + centre-crop rate of the same JPEGs measured in the same run."""
from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from aligntok.data.dataset import ShardDataset
from aligntok.data.sources import center_crop, prepare_dataset
from aligntok.data.synthetic import synthetic_image

JPEG_SIZE = (500, 375)  # a typical ImageNet photo


def _write_jpegs(root: Path, n: int, classes: int = 10) -> list[Path]:
    paths = []
    for i in range(n):
        img = synthetic_image(i, i % classes, JPEG_SIZE[1], seed=1234).resize(JPEG_SIZE, Image.Resampling.BICUBIC)
        path = root / f"class{i % classes:02d}" / f"img{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
        paths.append(path)
    return paths


def _rate(n: int, fn) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def _pil_limit(datas: list[bytes], resolution: int) -> float:
    def go():
        for d in datas:
            img = Image.open(io.BytesIO(d))
            img.load()
            center_crop(img.convert("RGB"), resolution)
    return _rate(len(datas), go)


def _loader_rate(data_dir: Path, num_workers: int) -> float:
    ds = ShardDataset(data_dir, "train")
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, num_workers=num_workers)

    def go():
        for _ in loader:
            pass
    return _rate(len(ds), go)


def run(out_dir: Path | None = None, resolutions=(64, 256), num_images: int = 256, quick: bool = False) -> dict:
    if quick:
        resolutions, num_images = (32,), 64
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        base = Path(out_dir) if out_dir is not None else Path(tmp)
        src = base / "jpegs"
        paths = _write_jpegs(src, num_images)
        datas = [p.read_bytes() for p in paths]
        figures = {}
        for res in resolutions:
            common = dict(resolution=res, num_images=num_images, num_classes=10, val_fraction=0.0,
                          shard_rows=1024, seed=0)
            limit = _pil_limit(datas, res)
            synth = _rate(num_images, lambda: prepare_dataset("synthetic", base / f"synthetic-{res}", root=None,
                                                              **common))
            folder = _rate(num_images, lambda: prepare_dataset("imagefolder", base / f"folder-{res}", root=src,
                                                               **common))
            figures[str(res)] = {
                "pil_decode_crop_1core_img_s": round(limit, 1),
                "prepare_synthetic_img_s": round(synth, 1),
                "prepare_imagefolder_img_s": round(folder, 1),
                "prepare_imagefolder_vs_pil_limit": round(folder / limit, 3),
                "prepare_synthetic_vs_pil_limit": round(synth / limit, 3),
                "loader_workers0_img_s": round(_loader_rate(base / f"folder-{res}", 0), 1),
                "loader_workers2_img_s": round(_loader_rate(base / f"folder-{res}", 2), 1),
            }
    return {"num_images": num_images, "jpeg_size": list(JPEG_SIZE), "cpu_count": os.cpu_count(),
            "note": "prepare also PNG-encodes and writes shards; the PIL limit only decodes and crops. "
                    "Loader rates include worker start-up.",
            "resolutions": figures}
