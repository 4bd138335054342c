"""`aligntok bench prepare`: images/s of prepare (synthetic and a JPEG image folder; one process and every core)
and of a DataLoader over the shards in training order, against the single-core PIL decode + centre-crop rate of
the same JPEGs measured in the same run."""
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
from aligntok.train.loop import StepBatches

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
    """One epoch in the training loop's order (row-group-local batches of 32, read by the streaming reader)."""
    ds = ShardDataset(data_dir, "train")
    sampler = StepBatches(len(ds), 32, -(-len(ds) // 32), 0, seed=0, group_sizes=ds.row_group_sizes)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=num_workers)

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
        cores = os.cpu_count() or 1
        for res in resolutions:
            # ~4 shards (units of work) per core, so every worker process stays busy
            common = dict(resolution=res, num_images=num_images, num_classes=10, val_fraction=0.0,
                          shard_rows=max(8, num_images // (4 * cores)), seed=0)
            limit = _pil_limit(datas, res)
            rates = {}
            for name, source, root in (("synthetic", "synthetic", None), ("imagefolder", "imagefolder", src)):
                for workers in (1, cores):  # a fresh folder each time: a finished one would only be resumed
                    out = base / f"{name}-{res}-w{workers}"
                    rates[name, workers] = _rate(num_images, lambda: prepare_dataset(
                        source, out, root=root, workers=workers, **common))
            folder = rates["imagefolder", 1]
            figures[str(res)] = {
                "pil_decode_crop_1core_img_s": round(limit, 1),
                "prepare_synthetic_img_s": round(rates["synthetic", 1], 1),
                "prepare_imagefolder_img_s": round(folder, 1),
                f"prepare_synthetic_{cores}proc_img_s": round(rates["synthetic", cores], 1),
                f"prepare_imagefolder_{cores}proc_img_s": round(rates["imagefolder", cores], 1),
                "prepare_imagefolder_vs_pil_limit": round(folder / limit, 3),
                "prepare_synthetic_vs_pil_limit": round(rates["synthetic", 1] / limit, 3),
                "loader_workers0_img_s": round(_loader_rate(base / f"imagefolder-{res}-w1", 0), 1),
                "loader_workers2_img_s": round(_loader_rate(base / f"imagefolder-{res}-w1", 2), 1),
            }
    return {"num_images": num_images, "jpeg_size": list(JPEG_SIZE), "cpu_count": os.cpu_count(),
            "note": "prepare also PNG-encodes and writes shards; the PIL limit only decodes and crops. "
                    "Multi-process prepare and loader rates include process start-up.",
            "resolutions": figures}
