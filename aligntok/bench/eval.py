"""CPU throughput of the evaluation path: feature extraction images/s at 256 px, and the time to turn
1K / 10K random feature sets into statistics and a Fréchet distance (at the extractor's dim and at 2048)."""
from __future__ import annotations

import time

import numpy as np
import torch

from aligntok.eval.features import build_feature_extractor
from aligntok.eval.metrics import feature_stats, frechet_distance

BATCH = 32
RANDOM_INIT_MAX_IMAGES = 64  # the 299-px Inception is slow on CPU; its rate is stable after a few batches


def _images_per_s(backbone: str, images: torch.Tensor) -> dict:
    ex = build_feature_extractor(backbone, seed=0)
    ex(images[:2])  # warm-up: first-call allocation and kernel selection
    t0 = time.perf_counter()
    for i in range(0, len(images), BATCH):
        ex(images[i:i + BATCH])
    seconds = time.perf_counter() - t0
    return {"images": len(images), "seconds": seconds, "img_per_s": len(images) / seconds, "dim": ex.dim}


def _fid_timing(n: int, dim: int, rng: np.random.Generator) -> dict:
    a, b = rng.normal(size=(n, dim)), rng.normal(0.1, 1.0, size=(n, dim))
    t0 = time.perf_counter()
    stats_a, stats_b = feature_stats(a), feature_stats(b)
    t1 = time.perf_counter()
    fd = frechet_distance(*stats_a, *stats_b)
    return {"n": n, "dim": dim, "stats_s": t1 - t0, "frechet_s": time.perf_counter() - t1, "fd": fd}


def run(n_images: int = 256, feature_sets=(1000, 10000), quick: bool = False) -> dict:
    if quick:
        n_images, feature_sets = 16, (1000,)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, 3, 256, 256), dtype=torch.uint8, generator=gen)
    extraction = {
        "efficientnet-lite0": _images_per_s("efficientnet-lite0", images),
        "random-init": _images_per_s("random-init", images[:min(n_images, RANDOM_INIT_MAX_IMAGES)]),
    }
    rng = np.random.default_rng(0)
    dims = sorted({extraction["efficientnet-lite0"]["dim"], 2048})
    fid = [_fid_timing(n, d, rng) for d in dims for n in feature_sets]
    return {"device": "cpu", "threads": torch.get_num_threads(), "image_size": 256, "batch_size": BATCH,
            "feature_extraction": extraction, "fid": fid}
