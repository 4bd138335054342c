"""`aligntok tokenizer-stage{1,2,3}`: the three-stage alignment of a foundation encoder into a tokenizer.

| stage | trains                         | frozen            | extra loss                                      |
| 1     | adapter, decoder               | encoder           | -                                               |
| 2     | encoder (own lr), adapter, dec | stage-1 copy      | semantic preservation: ||z - z_stage1||^2       |
| 3     | decoder                        | encoder, adapter  | -                                               |
The from-scratch VAE baseline (tokenizer.kind: vae) has nothing pretrained to freeze, so its stage 1 trains
its encoder too; stages 2 and 3 follow the same recipe.

The GAN carries over: each stage exports its discriminator and that optimiser's state beside its model
(outputs/tokenizer/stageN/discriminator/), and the next stage starts from them, so stage 2's adversarial
gradients into the freshly unfrozen encoder come from a trained discriminator, not a random one at disc_start 0.
A stage without a GAN (disc_weight 0, or a pass-through) hands the previous one on unchanged.

tokenizer.kind external (a pretrained diffusers AutoencoderKL, aligntok.models.external) trains in no stage: stage 1
loads tokenizer.external and writes its folder, stages 2 and 3 pass it on (their steps are not read); each stage
still measures it, so the baseline's rFID/PSNR/SSIM/LPIPS sit beside the trained tokenizers'.
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aligntok.config import Params, TokenizerStageConfig
from aligntok.fingerprint import file_hash, tokenizer_hash
from aligntok.stages.common import (CHECKPOINTS, data_dir, feature_extractor, tokenizer_dir, write_metrics,
                                    write_plots)
from aligntok.train.checkpoint import find_checkpoint
from aligntok.train.dist import cleanup, init_distributed
from aligntok.train.loop import adamw, state_hash, train
from aligntok.tracking import stage_run


def tokenizer_config(params: Params) -> dict:
    t = params.tokenizer
    return {"kind": t.kind, "encoder_arch": params.encoder.arch, "encoder_pretrained": params.encoder.pretrained,
            "image_size": params.data.resolution, "latent_channels": t.latent_channels, "size": t.size,
            "kl": t.kl, "adapter_hidden": t.adapter_hidden, "latent_stride": t.latent_stride}


def trainable_parts(kind: str, stage: int) -> set[str]:
    """Which tokenizer parts train in each stage (the paper's table; see module docstring)."""
    if stage == 1:
        return {"encoder", "adapter", "decoder"} if kind == "vae" else {"adapter", "decoder"}
    return {"encoder", "adapter", "decoder"} if stage == 2 else {"decoder"}


DISC_WEIGHTS, DISC_OPTIMIZER = "discriminator.safetensors", "optimizer.pt"


def discriminator_dir(stage: int) -> Path:
    """Stage `stage`'s discriminator export, beside its model (inside the stage's DVC out)."""
    return tokenizer_dir(stage).parent / "discriminator"


def save_discriminator(disc: nn.Module, opt: torch.optim.Optimizer, directory: Path) -> None:
    from aligntok.io import write_bytes_atomic, write_safetensors_atomic
    write_safetensors_atomic(directory / DISC_WEIGHTS, {k: v.detach().cpu().contiguous()
                                                        for k, v in disc.state_dict().items()})
    buf = io.BytesIO()
    torch.save(opt.state_dict()["state"], buf)  # moments and step count; the hyperparameters are the next stage's
    write_bytes_atomic(directory / DISC_OPTIMIZER, buf.getvalue())


def carry_discriminator(recipe: "TokenizerRecipe", directory: Path) -> bool:
    """Load the previous stage's discriminator weights and its optimiser's moments and step count into this stage's
    (its lr, betas and weight decay stay this stage's). False, and nothing loaded, when there is none to carry."""
    opt = recipe.optimizers().get("discriminator")
    if opt is None or not (directory / DISC_WEIGHTS).exists():
        return False
    from safetensors.torch import load_file
    recipe.disc.load_state_dict(load_file(str(directory / DISC_WEIGHTS), device=str(next(recipe.disc.parameters()).device)))
    state = opt.state_dict()
    state["state"] = torch.load(directory / DISC_OPTIMIZER, map_location="cpu", weights_only=True)
    opt.load_state_dict(state)
    return True


def encoder_grad_ratio(numerator: torch.Tensor, denominator: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """||d numerator / d theta|| / ||d denominator / d theta|| over the trainable parameters theta of `module` (2-norms
    over all of them together), a 0-d tensor left on the device; the graph is kept for the step's own backward."""
    params = [p for p in module.parameters() if p.requires_grad]

    def norm(loss):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads if g is not None]))
    return (norm(numerator) / norm(denominator)).detach()


class TokenizerRecipe:
    def __init__(self, model, discriminator, loss_fn, cfg: TokenizerStageConfig, stage: int, kind: str,
                 target=None):
        self.model, self.net, self.disc, self.loss_fn = model, model, discriminator, loss_fn
        self.cfg, self.stage, self.target = cfg, stage, target
        parts = trainable_parts(kind, stage)
        for name in ("encoder", "adapter", "decoder"):
            module = getattr(model, name)
            module.requires_grad_(name in parts)
            module.train(name in parts)
        groups = []
        for name in ("encoder", "adapter", "decoder"):
            if name in parts:
                lr = getattr(cfg, "encoder_lr", cfg.lr) if name == "encoder" and kind == "aligntok" else cfg.lr
                groups.append({"params": list(getattr(model, name).parameters()), "lr": lr, "name": name})
        betas, device = (cfg.beta1, cfg.beta2), next(model.parameters()).device
        if device.type == "cuda":  # NHWC, the tensor cores' own layout, for the conv nets; the CPU keeps NCHW
            model.decoder.to(memory_format=torch.channels_last)
            if discriminator is not None:
                discriminator.to(memory_format=torch.channels_last)
        self._opts = {"generator": adamw(groups, device, betas=betas, weight_decay=cfg.weight_decay)}
        if discriminator is not None and cfg.disc_weight > 0:
            self._opts["discriminator"] = adamw(discriminator.parameters(), device, lr=cfg.disc_lr,
                                                betas=(cfg.disc_beta1, cfg.disc_beta2),
                                                weight_decay=cfg.disc_weight_decay)

    def modules(self):
        mods = {"tokenizer": self.model}
        if self.disc is not None:
            mods["discriminator"] = self.disc
        return mods

    def ema_modules(self):
        return {"tokenizer": self.model}

    def optimizers(self):
        return self._opts

    def wrap(self, fn):
        self.net = fn(self.model)
        if "discriminator" in self._opts:
            self.loss_fn.discriminator = fn(self.disc)

    def losses(self, batch, step):
        x = batch[0]
        disc_params = list(self.disc.parameters()) if self.disc is not None else []
        for p in disc_params:  # the generator loss must not put gradients into the discriminator
            p.requires_grad_(False)
        x_rec, mean, logvar = self.net(x)
        g_loss, logs = self.loss_fn.generator_loss(x, x_rec, mean, logvar, self.model.decoder.last_layer, step)
        weight = getattr(self.cfg, "semantic_weight", 0.0)
        if self.target is not None and weight > 0:
            from aligntok.losses import semantic_preservation_loss
            with torch.no_grad():
                z_ref = self.target.encode(x)
            sp = semantic_preservation_loss(mean, z_ref, kind=self.cfg.semantic_distance)
            if (step + 1) % self.cfg.log_every == 0:  # on the steps whose window is logged: 2 extra backward passes
                logs["sp_grad_ratio"] = encoder_grad_ratio(weight * sp, g_loss, self.model.encoder)
            g_loss = g_loss + weight * sp
            logs["semantic_preservation"] = sp.detach()
        for p in disc_params:
            p.requires_grad_(True)
        losses = {"generator": g_loss}
        if "discriminator" in self._opts:
            d_loss, d_logs = self.loss_fn.discriminator_loss(x, x_rec.detach(), step)
            losses["discriminator"] = d_loss
            logs.update(d_logs)
        logs["loss"] = g_loss.detach()  # logs stay on the device: the loop reads them once per log window
        return losses, logs

    @torch.no_grad()
    def preview(self, batch, step) -> np.ndarray:
        x = batch[0][:8]
        x_rec = self.model.decode(self.model.encode(x)).clamp(-1, 1)
        grid = torch.cat([x, x_rec], dim=2)  # originals above reconstructions
        grid = torch.cat(list(grid), dim=2)  # side by side
        return ((grid.permute(1, 2, 0).float().cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def build_stage_model(params: Params, stage: int):
    from aligntok.models.tokenizer import AlignTokenizer

    if stage == 1 and params.tokenizer.kind == "external":
        from aligntok.models.external import ExternalTokenizer
        t = params.tokenizer
        return ExternalTokenizer.from_source(t.external, t.external_subfolder, params.data.resolution)
    if stage == 1:
        return AlignTokenizer(tokenizer_config(params))
    prev = tokenizer_dir(stage - 1)
    return AlignTokenizer.from_pretrained(prev)


def input_hash(params: Params, stage: int) -> str:
    if stage == 1:
        from aligntok.data.shards import read_manifest
        return read_manifest(data_dir(params))["content_hash"]
    prev = discriminator_dir(stage - 1)  # the carried discriminator is an input too
    return "-".join([tokenizer_hash(tokenizer_dir(stage - 1)),
                     *(file_hash(prev / f) for f in (DISC_WEIGHTS, DISC_OPTIMIZER) if (prev / f).exists())])


def stage_recipe(params: Params, stage: int, model, target, lpips_fn, device) -> tuple[TokenizerRecipe, str]:
    """The stage's recipe, its discriminator carried from the previous stage when there is one; and how the
    discriminator started ('none', 'random', or 'carried from stage N'), for the protocol file."""
    from aligntok.losses import ReconstructionLoss
    from aligntok.models.discriminator import PatchDiscriminator

    cfg: TokenizerStageConfig = getattr(params.tokenizer, f"stage{stage}")
    disc = PatchDiscriminator().to(device) if cfg.disc_weight > 0 else None
    loss_fn = ReconstructionLoss(lpips_fn, l1_weight=cfg.l1_weight, lpips_weight=cfg.lpips_weight,
                                 kl_weight=cfg.kl_weight if params.tokenizer.kl else 0.0,
                                 disc_weight=cfg.disc_weight, disc_start=cfg.disc_start, discriminator=disc)
    recipe = TokenizerRecipe(model, disc, loss_fn, cfg, stage, params.tokenizer.kind, target)
    if disc is None:
        return recipe, "none"
    carried = stage > 1 and carry_discriminator(recipe, discriminator_dir(stage - 1))
    return recipe, f"carried from stage {stage - 1}" if carried else "random"


def export_discriminator(recipe: TokenizerRecipe, stage: int, trained: bool) -> None:
    """Stage 1 and 2 hand their discriminator on: this stage's when it trained one, else the previous stage's."""
    out = discriminator_dir(stage)
    shutil.rmtree(out, ignore_errors=True)
    if trained and "discriminator" in recipe.optimizers():
        out.mkdir(parents=True)
        save_discriminator(recipe.disc, recipe.optimizers()["discriminator"], out)
    elif stage > 1 and discriminator_dir(stage - 1).is_dir():
        shutil.copytree(discriminator_dir(stage - 1), out)


def run(params: Params, args) -> int:
    from aligntok.data.dataset import ShardDataset, loader_workers
    from aligntok.eval.coord import Coord
    from aligntok.losses import build_lpips

    stage = int(args.stage[-1])
    name = f"tokenizer-stage{stage}"
    cfg: TokenizerStageConfig = getattr(params.tokenizer, f"stage{stage}")
    external = params.tokenizer.kind == "external"  # a pretrained VAE: no stage trains it
    if stage == 1 and cfg.steps == 0 and not external:
        from aligntok.config import ConfigError
        raise ConfigError("tokenizer.stage1.steps: 0 given; stage 1 must train (only stages 2 and 3 may pass through)")
    dist = init_distributed(params.launcher.device, timeout_s=params.launcher.timeout_s)
    torch.manual_seed(params.seed + 1000 * stage + dist.rank)
    model = build_stage_model(params, stage).to(dist.device)
    lpips_fn = build_lpips(params.lpips.net, params.lpips.pretrained_backbone).to(dist.device)
    if external:  # its own stage-1 reference for the semantic cosine (1.0): no second copy is loaded
        target, (recipe, disc_init) = model if stage > 1 else None, (None, "none")
    else:
        target = load_tokenizer(1, dist.device) if stage == 2 else None
        recipe, disc_init = stage_recipe(params, stage, model, target, lpips_fn, dist.device)
    trains = cfg.steps > 0 and not external
    train_set = ShardDataset(data_dir(params), "train")
    config_hash = state_hash(params.result_hash(f"tokenizer.stage{stage}", "encoder", "lpips", "data"),
                             tokenizer_config(params), input_hash(params, stage), params.seed)
    ckpt_dir = CHECKPOINTS / name
    resume = find_checkpoint(ckpt_dir, config_hash)
    workers = loader_workers(params.data.num_workers, params.launcher.nproc_per_node)
    with stage_run(params, name, resume.run_id if resume else None) as tracker:
        if not trains:  # pass-through (the previous stage's model, unchanged), or the external VAE as loaded
            result = {"ema": {}, "history": [], "step": 0}
        else:
            result = train(recipe, train_set, cfg, dist=dist, ckpt_dir=ckpt_dir, config_hash=config_hash,
                           seed=params.seed + stage, tracker=tracker, resume=resume, hflip=params.data.hflip,
                           num_workers=workers, stop_after=_stop_after(), desc=name)
        final = result["ema"].get("tokenizer", model) if result["ema"] else model
        out = tokenizer_dir(stage)
        if dist.is_main:
            final.save_pretrained(out)
            if stage < 3:
                export_discriminator(recipe, stage, trained=trains)
        # every rank measures its share of the val images; the numbers come back on rank 0 only
        metrics = measure(params, final, stage, dist.device, Coord(dist.rank, dist.world_size), workers,
                          target=target, lpips_fn=lpips_fn)
        if dist.is_main:
            metrics["lpips_backbone"] = "pretrained" if params.lpips.pretrained_backbone else "random"
            metrics["fid_backbone"] = params.eval.fid_backbone
            metrics["feature_dim"] = params.eval.feature_dim or "default"
            metrics["steps"] = result["step"]
            metrics["discriminator_init"] = disc_init
            write_metrics(name, metrics, tracker, step=result["step"])
            write_plots(name, result["history"])
            if stage == 3:  # the final tokenizer: an MLflow model, registered with alias latest-good
                tracker.log_model(out, "tokenizer")
            else:
                tracker.log_artifact(out, "model")
            print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    cleanup()
    return 0


def load_tokenizer(stage: int, device: torch.device):
    """Stage `stage`'s exported tokenizer, frozen, in eval mode, on `device`."""
    from aligntok.models.tokenizer import AlignTokenizer
    return AlignTokenizer.from_pretrained(tokenizer_dir(stage)).to(device).eval().requires_grad_(False)


def measurement_modules(params: Params, stage: int, device: torch.device, *, target=None, lpips_fn=None,
                        extractor=None) -> dict[str, nn.Module]:
    """What measuring stage `stage`'s tokenizer runs besides the tokenizer, each on `device`: the FID feature
    extractor, LPIPS, and from stage 2 on the stage-1 tokenizer the semantic cosine compares with. Modules already
    built (stage 2's `target`, the training LPIPS, evaluate's extractor) are reused."""
    from aligntok.losses import build_lpips

    extractor = feature_extractor(params) if extractor is None else extractor
    lpips_fn = build_lpips(params.lpips.net, params.lpips.pretrained_backbone) if lpips_fn is None else lpips_fn
    mods = {"extractor": extractor.to(device).eval(), "lpips_fn": lpips_fn.to(device)}
    if stage > 1:
        mods["reference"] = load_tokenizer(1, device) if target is None else target.to(device)
    return mods


def measure(params: Params, tokenizer, stage: int, device: torch.device, coord, num_workers: int,
            **reuse) -> dict | None:
    """rFID, PSNR, SSIM, LPIPS and semantic cosine of `tokenizer` on the first tokenizer.eval_images val images,
    split over the ranks of `coord`; the metrics on rank 0, None elsewhere. `reuse`: see `measurement_modules`."""
    from aligntok.data.dataset import ShardDataset
    from aligntok.eval.reconstruction import reconstruction_metrics

    return reconstruction_metrics(tokenizer, ShardDataset(data_dir(params), "val"),
                                  num_images=params.tokenizer.eval_images, device=device, coord=coord,
                                  num_workers=num_workers, **measurement_modules(params, stage, device, **reuse))


def _stop_after() -> int | None:
    """Test hook: ALIGNTOK_STOP_AFTER=N interrupts training after step N (as a kill would, after a checkpoint)."""
    import os
    v = os.environ.get("ALIGNTOK_STOP_AFTER")
    return int(v) if v else None
