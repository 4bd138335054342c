"""Tokenizer train-step throughput per stage, and achieved FLOP/s against a GEMM peak measured in the same run."""
from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from aligntok.config import Stage2Config, TokenizerStageConfig

CONFIGS = {
    "tiny@64": {"kind": "aligntok", "encoder_arch": "tf_efficientnet_lite0", "encoder_pretrained": "none",
                "image_size": 64, "latent_channels": 32, "size": "tiny", "kl": False, "adapter_hidden": 128},
    "dinov2-B@256": {"kind": "aligntok", "encoder_arch": "vit_base_patch14_dinov2", "encoder_pretrained": "none",
                     "image_size": 256, "latent_channels": 32, "size": "paper", "kl": False, "adapter_hidden": 512},
}


def _recipe(config: dict, stage: int):
    from aligntok.losses import ReconstructionLoss, build_lpips
    from aligntok.models.discriminator import PatchDiscriminator
    from aligntok.models.tokenizer import AlignTokenizer
    from aligntok.stages.tokenizer import TokenizerRecipe

    model = AlignTokenizer(config)
    target = AlignTokenizer(config).eval().requires_grad_(False) if stage == 2 else None
    disc = PatchDiscriminator()
    cfg = (Stage2Config if stage == 2 else TokenizerStageConfig)(disc_start=0, disc_weight=0.5)
    loss = ReconstructionLoss(build_lpips("vgg", pretrained_backbone=False), l1_weight=1.0, lpips_weight=1.0,
                              kl_weight=0.0, disc_weight=0.5, disc_start=0, discriminator=disc)
    return TokenizerRecipe(model, disc, loss, cfg, stage, "aligntok", target)


def _step(recipe, x, y):
    for opt in recipe.optimizers().values():
        opt.zero_grad(set_to_none=True)
    losses, _ = recipe.losses((x, y), step=1)
    sum(v for v in losses.values() if v is not None).backward()
    for opt in recipe.optimizers().values():
        opt.step()


def measure(name: str, stage: int, batch: int, steps: int) -> dict:
    config = CONFIGS[name]
    torch.manual_seed(0)
    recipe = _recipe(config, stage)
    res = config["image_size"]
    x, y = torch.rand(batch, 3, res, res) * 2 - 1, torch.zeros(batch, dtype=torch.long)
    _step(recipe, x, y)  # warm-up
    counter = FlopCounterMode(display=False)
    with counter:
        _step(recipe, x, y)
    t0 = time.perf_counter()
    for _ in range(steps):
        _step(recipe, x, y)
    sec = (time.perf_counter() - t0) / steps
    flops = counter.get_total_flops()
    return {"config": name, "stage": stage, "batch": batch, "s_per_step": sec, "img_per_s": batch / sec,
            "flop_per_step": flops, "achieved_flop_s": flops / sec}


def run(quick: bool = False) -> dict:
    from aligntok.stages.bench import gemm_peak_flops

    peak = gemm_peak_flops()
    plan = [("tiny@64", 16, 3 if quick else 10)] + ([] if quick else [("dinov2-B@256", 2, 2)])
    rows = [measure(name, stage, batch, steps) for name, batch, steps in plan for stage in (1, 2, 3)]
    for r in rows:
        r["fraction_of_gemm_peak"] = r["achieved_flop_s"] / peak
    return {"gemm_peak_flop_s": peak, "threads": torch.get_num_threads(), "rows": rows}
