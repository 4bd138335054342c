"""Feature-extraction images/s at 256 px and Fréchet-distance time for 1K / 10K feature sets."""
from __future__ import annotations

import time

import numpy as np
import torch

from aligntok.eval.features import build_feature_extractor
from aligntok.eval.metrics import feature_stats, frechet_distance


def run(quick: bool = False, n_images: int = 128, feature_sets=(1000, 10000)) -> dict:
    if quick:
        n_images, feature_sets = 16, (1000,)
    images = torch.randint(0, 256, (n_images, 3, 256, 256), dtype=torch.uint8)
    extract = {}
    for backbone in ("efficientnet-lite0", "random-init"):
        ex = build_feature_extractor(backbone, seed=0)
        ex(images[:4])
        t0 = time.perf_counter()
        for i in range(0, n_images, 32):
            ex(images[i:i + 32])
        extract[backbone] = {"img_per_s": n_images / (time.perf_counter() - t0), "dim": ex.dim}
    fid = []
    rng = np.random.default_rng(0)
    for dim in (320, 2048):
        for n in feature_sets:
            a, b = rng.normal(size=(n, dim)), rng.normal(0.1, 1.0, size=(n, dim))
            t0 = time.perf_counter()
            stats_a, stats_b = feature_stats(a), feature_stats(b)
            t1 = time.perf_counter()
            fd = frechet_distance(*stats_a, *stats_b)
            fid.append({"n": n, "dim": dim, "stats_s": t1 - t0, "frechet_s": time.perf_counter() - t1, "fd": fd})
    return {"feature_extraction_256px": extract, "fid": fid, "threads": torch.get_num_threads()}
