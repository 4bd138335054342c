"""gpu-check's tokenizer and evaluation rows, each through the code the pipeline stage runs: a tokenizer stage-2
train step (TokenizerRecipe with the semantic-preservation target, both GAN losses, EMA), cache-latents
(`encode_split` over prepared synthetic shards), evaluate's sampling + decoding (`do_part`), and FID feature
extraction (`extract`). Weights are random (the GPU node may be offline): the compute is the trained model's."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aligntok.bench.dit import NUM_CLASSES
from aligntok.bench.gpu_dit import sync, timed
from aligntok.config import EvalConfig, LatentsConfig, SampleConfig, Stage2Config
from aligntok.train.loop import bf16_autocast


def tokenizer_stage2(config: dict, cfg: Stage2Config, lpips_net: str, batch: int, device: torch.device,
                     warmup: int, steps: int, budget_s: float) -> dict:
    """One stage-2 step as train() runs it: both optimisers, bf16 autocast (cfg.amp), then the EMA update."""
    from aligntok.losses import ReconstructionLoss, build_lpips
    from aligntok.models.discriminator import PatchDiscriminator
    from aligntok.models.tokenizer import AlignTokenizer
    from aligntok.stages.tokenizer import TokenizerRecipe
    from aligntok.train.schedule import EMA

    torch.manual_seed(0)
    model = AlignTokenizer(config).to(device)
    target = AlignTokenizer(config).to(device).eval().requires_grad_(False)  # the frozen stage-1 tokenizer
    disc = PatchDiscriminator().to(device)
    lpips_fn = build_lpips(lpips_net, pretrained_backbone=False).to(device)  # same trunk, random: no download
    loss_fn = ReconstructionLoss(lpips_fn, l1_weight=cfg.l1_weight, lpips_weight=cfg.lpips_weight,
                                 kl_weight=cfg.kl_weight if config["kl"] else 0.0, disc_weight=cfg.disc_weight,
                                 disc_start=cfg.disc_start, discriminator=disc)
    recipe = TokenizerRecipe(model, disc, loss_fn, cfg, 2, config["kind"], target)
    ema = EMA(recipe.ema_modules(), cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay else None
    res = config["image_size"]
    x = torch.rand(batch, 3, res, res, device=device) * 2 - 1
    y = torch.zeros(batch, dtype=torch.long, device=device)

    # past disc_start (the GAN trains too), and not a logged step (those add two backward passes every log_every)
    at = cfg.disc_start + 1 if (cfg.disc_start + 2) % cfg.log_every else cfg.disc_start + 2

    def step():
        for opt in recipe.optimizers().values():
            opt.zero_grad(set_to_none=True)
        with bf16_autocast(device, cfg.amp):
            losses, _ = recipe.losses((x, y), step=at)
        sum(v for v in losses.values() if v is not None).backward()
        for opt in recipe.optimizers().values():
            opt.step()
        if ema:
            ema.update(recipe.ema_modules())

    r = timed(step, device, warmup, steps, budget_s)
    return {"img_per_s": batch / r["s_per_step"], **r,
            "note": (f"{config['encoder_arch']} random init, {res} px, semantic_weight {cfg.semantic_weight:g}, "
                     f"GAN on, EMA {'on' if ema else 'off'}, LPIPS {lpips_net} random trunk")}


def cache_latents(config: dict, latents: LatentsConfig, images: int, workers: int, device: torch.device) -> dict:
    """`encode_split` (what cache-latents runs on each rank) over `images` synthetic images prepared into shards,
    decoded from PNG by `workers` loader processes as the stage does; one untimed batch first."""
    from aligntok.data.dataset import ShardDataset
    from aligntok.data.sources import prepare_dataset
    from aligntok.models.tokenizer import AlignTokenizer
    from aligntok.stages.latents import encode_split, rank_shards

    res, b = config["image_size"], latents.batch_size
    with tempfile.TemporaryDirectory(prefix="aligntok-gpu-check-") as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "latents"
        prepare_dataset("synthetic", data, root=None, resolution=res, num_images=images, num_classes=10,
                        val_fraction=0.0, shard_rows=max(1, images // 4), seed=0, workers=None if images > 64 else 1)
        out.mkdir()
        torch.manual_seed(0)
        tokenizer = AlignTokenizer(config).to(device).eval()
        warm = ShardDataset(data, "train")
        with torch.no_grad(), bf16_autocast(device):
            tokenizer.encode(torch.stack([warm[i][0] for i in range(min(b, len(warm)))]).to(device))
        sync(device)
        dataset = ShardDataset(data, "train")  # a fresh reader: no row groups cached by the warm-up
        t0 = time.perf_counter()
        _, encoded, _ = encode_split(tokenizer, dataset, rank_shards(len(dataset), latents.shard_rows, 0, 1), out,
                                     shard_rows=latents.shard_rows, batch_size=b, hflip=latents.hflip,
                                     tok_hash="gpu-check", device=device, num_workers=workers,
                                     show_progress=False)
        seconds = time.perf_counter() - t0
    return {"img_per_s": encoded / seconds, "s_per_step": seconds / -(-encoded // b), "timed_steps": -(-encoded // b),
            "note": (f"{encoded} synthetic {res}-px images from PNG shards, {workers} loader worker(s)"
                     f"{', each also flipped (latents.hflip)' if latents.hflip else ''}; shard written")}


def evaluate(config: dict, dit_name: str, sample: SampleConfig, ev: EvalConfig, images: int,
             step_counts: tuple[int, int], device: torch.device) -> dict:
    """evaluate's `do_part` (noise, the guided ODE, decoding, uint8, the part file) for the with-CFG variant at two
    reduced step counts; the per-step and per-image costs they give are extrapolated to `sample.steps`."""
    from aligntok.eval.parts import PartStore, Variant, do_part, split_parts
    from aligntok.generate import Generator
    from aligntok.models.dit import build_dit
    from aligntok.models.tokenizer import AlignTokenizer

    torch.manual_seed(0)
    tokenizer = AlignTokenizer(config).to(device).eval()
    c, g = tokenizer.latent_channels, tokenizer.grid_size
    dit = build_dit(dit_name, input_size=g, in_channels=c, num_classes=NUM_CLASSES).to(device).eval()
    gen = Generator(dit, {"in_channels": c, "input_size": g, "num_classes": NUM_CLASSES,
                          "latent_stats": {"mean": [0.0] * c, "std": [1.0] * c}}, tokenizer, device)
    parts = split_parts(Variant("_cfg", ev.cfg_scale), images, ev.batch_size)
    lo, hi = step_counts
    with tempfile.TemporaryDirectory(prefix="aligntok-gpu-check-") as tmp:
        store = PartStore(Path(tmp), "gpu-check", NUM_CLASSES, ev.labels, sample.seed)
        store.dir.mkdir(parents=True)

        def run(steps: int, todo) -> float:
            cfg = sample.model_copy(update={"steps": steps})
            sync(device)
            t0 = time.perf_counter()
            for part in todo:
                do_part(store, "make", part, gen, cfg, None, ev.amp)
            sync(device)
            return time.perf_counter() - t0

        run(lo, parts[:1])  # warm-up: the same shapes, guided steps (a doubled batch) included
        t_lo, t_hi = run(lo, parts), run(hi, parts)
    per_step = max(t_hi - t_lo, 0.0) / (hi - lo) / images
    fixed = max(t_lo / images - lo * per_step, 0.0)  # noise, decoding, uint8, the part file
    s_per_image = fixed + sample.steps * per_step
    return {"img_per_s": 1 / s_per_image, "s_per_step": s_per_image * ev.batch_size, "timed_steps": 2 * len(parts),
            "img_per_s_measured": {str(lo): images / t_lo, str(hi): images / t_hi},
            "s_per_image_fixed": fixed, "s_per_image_per_step": per_step,
            "note": (f"{images} images at {lo} and {hi} steps ({images / t_lo:.1f} / {images / t_hi:.1f} img/s), "
                     f"extrapolated to {sample.steps}; the with-CFG variant (no-CFG costs less); random DiT and "
                     f"decoder, no features")}


def inception_file(given: str | None) -> Path | None:
    """The FID Inception weights: `given`, else the copy evaluate caches under $TORCH_HOME (None: not there)."""
    from aligntok.eval.features import INCEPTION_FILE
    if given:
        return Path(given)
    cached = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "aligntok" / INCEPTION_FILE
    return cached if cached.is_file() else None


def inception(weights: Path | None, images: int, batch: int, res: int, device: torch.device) -> dict:
    """`extract` (float32, TF32 off, as evaluate runs it) over random uint8 images; one untimed batch first."""
    from aligntok.eval.features import build_feature_extractor, extract

    extractor = (build_feature_extractor("inception", str(weights)) if weights is not None
                 else build_feature_extractor("random-init", seed=0)).to(device)
    pixels = np.random.default_rng(0).integers(0, 256, (images, res, res, 3), dtype=np.uint8)
    extract(extractor, pixels[:batch], batch_size=batch)
    sync(device)
    t0 = time.perf_counter()
    extract(extractor, pixels, batch_size=batch)
    seconds = time.perf_counter() - t0
    note = (f"FID Inception-V3 weights {weights}" if weights is not None else
            "random-init Inception-V3 (timm; the FID weights file is absent: --inception-weights): same "
            "architecture and input size, so the same cost")
    return {"img_per_s": images / seconds, "s_per_step": seconds / -(-images // batch),
            "timed_steps": -(-images // batch), "note": f"{images} images of {res} px, resized to 299; {note}"}
