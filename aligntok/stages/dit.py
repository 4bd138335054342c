"""`aligntok train-dit`: LightningDiT with flow matching on the cached (normalised) latents."""
from __future__ import annotations

import math

import numpy as np
import torch

from aligntok.config import DitConfig, Params
from aligntok.data.latents import LatentDataset, normalize, stats_tensors
from aligntok.stages.common import (CHECKPOINTS, DIT_DIR, JUDGE_DIR, LATENTS_DIR, tokenizer_dir, write_metrics,
                                    write_plots)
from aligntok.train.checkpoint import find_checkpoint
from aligntok.train.dist import cleanup, init_distributed
from aligntok.train.loop import adamw, state_hash, train
from aligntok.tracking import stage_run


class DitRecipe:
    """Class task: batches (latents, labels). Text task (`prompts` given: the probe's caption strings, whose encoder
    states the generator holds): batches (latents, caption states, caption mask)."""

    def __init__(self, model, cfg: DitConfig, stats: dict, generator=None, sample_cfg=None,
                 prompts: list[str] | None = None):
        from aligntok.diffusion.flow import FlowMatching

        self.model = self.net = model
        self.stats, self.generator, self.sample_cfg, self.prompts = stats, generator, sample_cfg, prompts
        self.text = getattr(model, "text_dim", None) is not None
        self._stats_on: tuple[torch.Tensor, torch.Tensor] | None = None
        self.probe_samples, self._judge = cfg.probe_samples, None
        if cfg.probe_every and generator is not None:
            # the probe's scorer, loaded now: a missing judge stops the stage before its first step, not at a probe
            if self.text:
                from aligntok.eval.caption_judge import load_caption_judge
                self._judge = load_caption_judge(JUDGE_DIR)
            else:
                from aligntok.eval.judge import load_judge
                self._judge = load_judge(JUDGE_DIR)
        self.flow = FlowMatching(timestep_sampling=cfg.timestep_sampling, use_cosine_loss=cfg.cosine_loss,
                                 lognormal_until=cfg.lognormal_until)
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
        z, *cond = batch
        if self._stats_on is None or self._stats_on[0].device != z.device:  # once: no host copy in every step
            self._stats_on = tuple(t.to(z.device) for t in stats_tensors(self.stats))
        model, y = self.net, cond[0] if cond else None
        if self.text:
            net, (hidden, mask) = self.net, cond

            def model(x, t, _):  # the caption rides along; the DiT drops captions (CFG) in train mode
                return net(x, t, hidden, mask)
        loss, logs = self.flow.loss(model, normalize(z, self._stats_on), y, step=step)
        if self.flow.lognormal_until is not None:  # the switch is on: the curve shows when t left log-normal
            logs["t_lognormal"] = float(self.flow.sampling_at(step) == "lognormal")
        logs["loss"] = loss.detach()  # read by the loop once per log window
        return {"dit": loss}, logs

    @torch.no_grad()
    def preview(self, batch, step) -> np.ndarray | None:
        """One sample per class (up to 8) from the current weights, decoded by the tokenizer."""
        if self.generator is None:
            return None
        from aligntok.generate import to_uint8_nhwc
        n = min(8, self.generator.num_conditions)
        was = self.model.training
        self.model.eval()
        imgs = self.generator.images(torch.arange(n), list(range(n)), self.sample_cfg)
        self.model.train(was)
        return np.concatenate(list(to_uint8_nhwc(imgs)), axis=1)


    @torch.no_grad()
    def probe(self, step) -> dict[str, float]:
        """The diffusability probe: judge scores of `probe_samples` class-balanced samples of the current weights
        (fixed noise and labels at every probe, so the curve shows the model changing, not the draw). Text task:
        the caption judge's scores of samples for the probe's prompts (each prompt in turn)."""
        from aligntok.generate import sample_labels, to_uint8_nhwc
        if self.generator is None:  # no tokenizer to decode with (rank > 0, or a recipe built without one)
            return {}
        was = self.model.training
        self.model.eval()
        n, images = self.probe_samples, []
        labels = sample_labels(range(n), self.generator.num_conditions, "balanced", 0)
        for start in range(0, n, 50):
            idx = list(range(start, min(n, start + 50)))
            x = self.generator.images(labels[idx], idx, self.sample_cfg, cfg_scale=1.0)
            images.append(torch.from_numpy(to_uint8_nhwc(x)).permute(0, 3, 1, 2))
        self.model.train(was)
        if self.text:
            from aligntok.eval.caption_judge import caption_scores
            scores = caption_scores(self._judge, torch.cat(images), [self.prompts[i] for i in labels.tolist()])
        else:
            from aligntok.eval.judge import judge_metrics
            scores = judge_metrics(self._judge, torch.cat(images), labels.numpy())
        return {f"probe_{k.removesuffix('_judge')}": v for k, v in scores.items()}


def last_probe(history: list[dict]) -> dict[str, float]:
    """The last probe's scores as run summaries, with the step they were measured at: `last_probe_fd`, ...,
    `last_probe_step`. Never the curve's own keys (probe_fd, ...): a metric logged without a step lands at step 0 in
    MLflow, where it read as the untrained model's score."""
    probes = [h for h in history if any(k.startswith("probe_") for k in h)]
    if not probes:
        return {}
    return {**{f"last_{k}": v for k, v in probes[-1].items() if k.startswith("probe_")},
            "last_probe_step": probes[-1]["step"]}


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


def _text_data(params: Params, latents: LatentDataset, n_prompts: int):
    """Text task: (the training set joining latents and caption states, text cache facts for the export, the first
    `n_prompts` train captions and their cached states: the preview's and the probe's prompts)."""
    from aligntok.data.captioned_latents import CaptionedLatents
    from aligntok.data.captions import iter_captions
    from aligntok.data.text_cache import TextCache
    from aligntok.stages.common import TEXT_DIR, data_dir

    text = TextCache(TEXT_DIR)
    data = CaptionedLatents(latents, text)
    n = min(n_prompts, len(text))
    captions = iter_captions(data_dir(params), "train")
    prompts = [next(captions) for _ in range(n)]
    rows = [text.get(i) for i in range(n)]
    states = (torch.stack([h for h, _ in rows]), torch.stack([m for _, m in rows]))
    facts = {"text_dim": text.dim, "max_tokens": text.max_tokens, "text_encoder": params.text.encoder,
             "text_encoder_hash": text.encoder_hash}
    return data, facts, prompts, states


def run(params: Params, args) -> int:
    from aligntok.generate import Generator
    from aligntok.models.dit_export import build_from_config, save_dit
    from aligntok.models.tokenizer import AlignTokenizer
    from aligntok.fingerprint import tokenizer_hash

    dist = init_distributed(params.launcher.device, timeout_s=params.launcher.timeout_s)
    torch.manual_seed(params.seed + 7 + dist.rank)
    tok_hash = tokenizer_hash(tokenizer_dir(3))
    data = LatentDataset(LATENTS_DIR, tok_hash)
    c, h, _ = data.manifest["latent_shape"]
    cfg = params.dit
    steps, epochs = resolve_steps(cfg, data.num_source_images)
    cfg = cfg.model_copy(update={"steps": steps})
    export = {"task": params.task, "model": cfg.model, "input_size": h, "in_channels": c,
              "num_classes": data.num_classes, "qk_norm": cfg.qk_norm, "latent_stats": data.stats,
              "tokenizer_hash": tok_hash}
    prompts = states = None
    if params.task == "text":
        data, facts, prompts, states = _text_data(params, data, max(8, cfg.probe_samples if cfg.probe_every else 8))
        export.update(facts)
    model = build_from_config(export).to(dist.device)
    if params.task == "text":
        model.caption_dropout_prob = params.text.caption_dropout
    else:
        model.class_dropout_prob = cfg.class_dropout
    model.grad_checkpointing = cfg.grad_checkpointing
    if cfg.compile:
        model.compile_blocks()
    preview = None
    if cfg.probe_every and params.judge.source == "none":
        from aligntok.config import ConfigError
        raise ConfigError("dit.probe_every needs the judge (judge.source: synthetic); set dit.probe_every: 0")
    if dist.is_main:
        tokenizer = AlignTokenizer.from_pretrained(tokenizer_dir(3)).to(dist.device).eval()
        preview = Generator(model, export, tokenizer, dist.device)
        if states is not None:
            preview.set_prompts(*states, digest="train captions")
    recipe = DitRecipe(model, cfg, data.stats, preview, params.sample, prompts)
    text_keys = ("text.encoder", "text.max_tokens", "text.caption_dropout") if params.task == "text" else ()
    config_hash = state_hash(params.result_hash("dit", *text_keys), tok_hash, data.manifest["data_content_hash"],
                             params.seed)
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
            losses = [h["loss"] for h in hist if "loss" in h]
            metrics = {"final_loss": losses[-1] if losses else float("nan"),
                       "first_loss": losses[0] if losses else float("nan"),
                       "steps": result["step"], "epochs": epochs, "latents": len(data),
                       "images": data.num_source_images, "ema": bool(result["ema"])}
            metrics.update(last_probe(hist))
            write_metrics("train-dit", metrics, tracker)
            write_plots("train-dit", [{k: v for k, v in h.items() if not k.startswith("probe_")}
                                      for h in hist if "loss" in h])  # the probe curve is in MLflow
            tracker.log_model(DIT_DIR, "dit")  # an MLflow model, registered with alias latest-good
            print(f"train-dit: {steps} steps ({epochs:.2f} epochs), loss {metrics['first_loss']:.4f} -> "
                  f"{metrics['final_loss']:.4f}")
    cleanup()
    return 0
