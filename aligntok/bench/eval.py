"""CPU throughput of the evaluation path: feature extraction images/s at 256 px, and the time to turn
1K / 10K random feature sets into statistics and a Fréchet distance (at the extractor's dim and at 2048).

`paper_estimate`: the paper-scale evaluate (FID-50K without and with CFG) in FLOPs per sample, counted on the
real models (LightningDiT-XL/1 forwards over the sampler's actual time grid and guidance interval, the tokenizer
decoder), turned into GPU-hours at a given achieved FLOP/s: by default the rate LightningDiT's own training anchor
implies (XL/1 trains at ~284 img/s per H800), since sampling runs the same forward under the same bf16."""
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


ANCHOR_TRAIN_IMG_PER_S = 284.0  # LightningDiT-XL/1 per H800 (its README: 64 epochs in ~10 h on 8 GPUs)
INCEPTION_GFLOP = 5.7  # Inception-V3 at 299 px, one image (not built here: its weights are a download)


def paper_estimate(gpus: int = 8, flop_s: float | None = None, num_samples: int = 50000, steps: int = 249,
                   cfg_scale: float = 10.0, cfg_interval_start: float = 0.10, timestep_shift: float = 0.3) -> dict:
    """Evaluate cost at the imagenet256 profile's settings; flop_s None: the training anchor's achieved rate."""
    from torch.utils.flop_counter import FlopCounterMode

    from aligntok.diffusion.sampler import cfg_active, time_grid
    from aligntok.models.decoder import Decoder
    from aligntok.models.dit import build_dit

    def count(fn) -> int:
        c = FlopCounterMode(display=False)
        with c:
            fn()
        return c.get_total_flops()

    with torch.device("meta"):
        dit = build_dit("LightningDiT-XL/1", input_size=16, in_channels=32, num_classes=1000)
        x, t, y = torch.empty(1, 32, 16, 16), torch.empty(1), torch.zeros(1, dtype=torch.long)
        with torch.no_grad():
            fwd = count(lambda: dit.eval()(x, t, y))
            dec = count(lambda: Decoder(32).eval()(x))
        dit.train()
        train = count(lambda: dit(x, t, y).sum().backward())
    guided = sum(cfg_active(s, cfg_scale, cfg_interval_start) for s in time_grid(steps, timestep_shift)[:-1])
    forwards = {"no_cfg": steps, "cfg": steps + guided}  # a guided step evaluates the null label too
    per_sample = {k: n * fwd + dec + INCEPTION_GFLOP * 1e9 for k, n in forwards.items()}
    total = num_samples * sum(per_sample.values())
    rate = flop_s or ANCHOR_TRAIN_IMG_PER_S * train
    gpu_s = total / rate
    return {"dit_forward_gflop_per_image": fwd / 1e9, "dit_train_gflop_per_image": train / 1e9,
            "decoder_gflop_per_image": dec / 1e9, "inception_gflop_per_image": INCEPTION_GFLOP,
            "steps": steps, "guided_steps": guided, "dit_forwards_per_sample": forwards,
            "tflop_per_sample": {k: v / 1e12 for k, v in per_sample.items()}, "num_samples_per_variant": num_samples,
            "total_pflop": total / 1e15, "assumed_flop_s_per_gpu": rate,
            "rate_source": "given" if flop_s else f"{ANCHOR_TRAIN_IMG_PER_S} train img/s x train FLOPs per image",
            "gpu_hours": gpu_s / 3600, "gpus": gpus, "wall_hours": gpu_s / 3600 / gpus}


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
            "feature_extraction": extraction, "fid": fid, "paper_evaluate_estimate": paper_estimate()}
