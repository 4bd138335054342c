"""`aligntok train-dit`: LightningDiT with flow matching on the cached (normalised) latents."""
from __future__ import annotations

import math

import numpy as np
import torch

from aligntok.config import DitConfig, Params
from aligntok.data.latents import LatentDataset, normalize
from aligntok.stages.common import CHECKPOINTS, DIT_DIR, LATENTS_DIR, tokenizer_dir, write_metrics, write_plots
from aligntok.train.checkpoint import find_checkpoint
from aligntok.train.dist import cleanup, init_distributed
from aligntok.train.loop import adamw, state_hash, train
from aligntok.tracking import stage_run


class DitRecipe:
    def __init__(self, model, cfg: DitConfig, stats: dict, generator=None, sample_cfg=None):
        from aligntok.diffusion.flow import FlowMatching

        self.model = self.net = model
        self.stats, self.generator, self.sample_cfg = stats, generator, sample_cfg
        self.flow = FlowMatching(timestep_sampling=cfg.timestep_sampling, use_cosine_loss=cfg.cosine_loss)
        self._opt = adamw(model.parameters(), next(model.parameters()).device, lr=cfg.lr,
                          betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)

    def modules(self):
        return {"dit": self.model}

    def ema_modules(self):
        return {"dit": self.model}

    def optimizers(self):
        return {"dit": self._opt}

    def wrap(self, fn):
        self.net = fn(self.model)

    def losses(self, batch, step):
        z, y = batch
        loss, logs = self.flow.loss(self.net, normalize(z, self.stats), y)
        logs["loss"] = float(loss.detach())
        return {"dit": loss}, logs

    @torch.no_grad()
    def preview(self, batch, step) -> np.ndarray | None:
        """One sample per class (up to 8) from the current weights, decoded by the tokenizer."""
        if self.generator is None:
            return None
        from aligntok.generate import to_uint8_nhwc
        n = min(8, self.model.num_classes)
        was = self.model.training
        self.model.eval()
        imgs = self.generator.images(torch.arange(n), list(range(n)), self.sample_cfg)
        self.model.train(was)
        return np.concatenate(list(to_uint8_nhwc(imgs)), axis=1)


def resolve_steps(cfg: DitConfig, num_images: int) -> tuple[int, float]:
    """(steps, epochs): `dit.epochs`, when set, decides the length; both are logged.

    An epoch is one pass over the source images: a cached flipped copy is a variant of its image (the sampler
    draws one per position), not a second image, so flips do not halve the epochs.
    """
    if cfg.epochs is not None:
        steps = max(1, math.ceil(cfg.epochs * num_images / cfg.batch_size))
    else:
        steps = cfg.steps
    return steps, steps * cfg.batch_size / num_images


def run(params: Params, args) -> int:
    from aligntok.generate import Generator, save_dit
    from aligntok.models.dit import build_dit
    from aligntok.models.tokenizer import AlignTokenizer
    from aligntok.stages.latents import tokenizer_hash

    dist = init_distributed(params.launcher.device)
    torch.manual_seed(params.seed + 7 + dist.rank)
    tok_hash = tokenizer_hash(tokenizer_dir(3))
    data = LatentDataset(LATENTS_DIR, tok_hash)
    c, h, _ = data.manifest["latent_shape"]
    cfg = params.dit
    steps, epochs = resolve_steps(cfg, data.num_source_images)
    cfg = cfg.model_copy(update={"steps": steps})
    model = build_dit(cfg.model, input_size=h, in_channels=c, num_classes=data.num_classes,
                      class_dropout_prob=cfg.class_dropout, qk_norm=cfg.qk_norm).to(dist.device)
    model.grad_checkpointing = cfg.grad_checkpointing
    if cfg.compile:
        model.compile_blocks()
    export = {"model": cfg.model, "input_size": h, "in_channels": c, "num_classes": data.num_classes,
              "qk_norm": cfg.qk_norm, "latent_stats": data.stats, "tokenizer_hash": tok_hash}
    preview = None
    if dist.is_main:
        tokenizer = AlignTokenizer.from_pretrained(tokenizer_dir(3)).to(dist.device).eval()
        preview = Generator(model, export, tokenizer, dist.device)
    recipe = DitRecipe(model, cfg, data.stats, preview, params.sample)
    config_hash = state_hash(params.result_hash("dit"), tok_hash, data.manifest["data_content_hash"], params.seed)
    ckpt_dir = CHECKPOINTS / "train-dit"
    resume = find_checkpoint(ckpt_dir, config_hash)
    with stage_run(params, "train-dit", resume.run_id if resume else None) as tracker:
        tracker.log_metrics({"steps_total": steps, "epochs_total": epochs})
        result = train(recipe, data, cfg, dist=dist, ckpt_dir=ckpt_dir, config_hash=config_hash,
                       seed=params.seed + 17, tracker=tracker, resume=resume, num_workers=0, desc="train-dit")
        if dist.is_main:
            final = result["ema"].get("dit", model)
            save_dit(final, DIT_DIR, export)
            hist = result["history"]
            metrics = {"final_loss": hist[-1]["loss"] if hist else float("nan"),
                       "first_loss": hist[0]["loss"] if hist else float("nan"),
                       "steps": result["step"], "epochs": epochs, "latents": len(data),
                       "images": data.num_source_images, "ema": bool(result["ema"])}
            write_metrics("train-dit", metrics, tracker)
            write_plots("train-dit", hist)
            tracker.log_model(DIT_DIR, "dit")  # an MLflow model, registered with alias latest-good
            print(f"train-dit: {steps} steps ({epochs:.2f} epochs), loss {metrics['first_loss']:.4f} -> "
                  f"{metrics['final_loss']:.4f}")
    cleanup()
    return 0
