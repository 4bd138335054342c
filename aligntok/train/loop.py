"""The one training loop every stage shares (tokenizer stages 1-3, LightningDiT).

A stage supplies a `Recipe`: which modules it saves, which optimisers it steps, and its losses. The loop does
the rest: deterministic step-indexed batches (so resume continues at the exact sample), warm-up + schedule,
gradient accumulation and clipping, optional EMA, bf16 autocast on CUDA, DDP, progress bar, MLflow metrics and
preview images, atomic checkpoints with automatic resume, and a clear stop on a NaN/Inf loss.

Logs and losses stay on the device between log steps (`aligntok.train.window`): a step reads nothing back to the
host, so the GPU never waits on Python. A non-finite loss is found at the next step that logs, checkpoints, previews
or probes (at most log_every - 1 steps late), always before a checkpoint is written.
"""
from __future__ import annotations

import contextlib
import hashlib
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from aligntok.config import TrainConfig
from aligntok.data.order import StepBatches
from aligntok.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from aligntok.train.dist import DistInfo
from aligntok.train.schedule import EMA, clip_gradients, lr_lambda, unwrap
from aligntok.train.window import Divergence, LogWindow, accumulate


class TrainingDiverged(RuntimeError):
    pass


class Recipe(Protocol):
    def modules(self) -> dict[str, nn.Module]: ...          # everything a checkpoint must hold
    def ema_modules(self) -> dict[str, nn.Module]: ...      # modules to keep an EMA of (may be empty)
    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...  # stepped in this order
    def wrap(self, fn: Callable[[nn.Module], nn.Module]) -> None: ...  # DDP-wrap what trains
    # losses per optimiser name (each loss must only put gradients into its own optimiser's parameters), and logs:
    # detached 0-d tensors, left on the device (floats for values already on the host)
    def losses(self, batch: Any, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | float]]: ...
    def preview(self, batch: Any, step: int) -> np.ndarray | None: ...  # HxWx3 uint8 grid, or None


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def cuda_fast_math(device: torch.device) -> None:
    """TF32 matmuls/convolutions on CUDA (about 2x fp32 GEMM throughput on A100/H100 for ~1e-3 relative
    rounding, below what bf16 autocast already accepts), and cuDNN's autotuner: every training step has the same
    shapes, so the fastest convolution algorithm is timed once per shape and reused (the conv tokenizer's decoder,
    discriminator and LPIPS; the DiT's patch embedding). A no-op on CPU, so CPU results never change."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def bf16_autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, a null context elsewhere: CPU autocast would change CPU results (and be slow)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def ddp_wrap(module: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """DDP as every training stage uses it. Bucket views: gradients live in the all-reduce buckets, saving one
    copy and one grad-sized buffer. Buffers are broadcast from rank 0 before each forward only when some change in
    training (`has_running_stats`); the others (the DiT's sin-cos positions and RoPE tables, the encoder's input
    mean/std) are computed identically on every rank, and broadcasting them would cost a collective per forward."""
    kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
    return nn.parallel.DistributedDataParallel(module, gradient_as_bucket_view=True,
                                               broadcast_buffers=has_running_stats(module), **kw)


def has_running_stats(module: nn.Module) -> bool:
    """Whether a forward pass in train mode can change a buffer: batch-norm running statistics (the PatchGAN
    discriminator's BatchNorm2d, a convolutional encoder such as EfficientNet; not DINOv2, the DiT or the decoder)."""
    return any(isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats for m in module.modules())


def adamw(params, device: torch.device, **kw) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step on CUDA (the per-parameter launches dominate small-batch steps);
    the CPU keeps the default implementation so CPU results stay bit-identical to before."""
    return torch.optim.AdamW(params, fused=True if device.type == "cuda" else None, **kw)


def state_hash(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def train(recipe: Recipe, dataset: torch.utils.data.Dataset, cfg: TrainConfig, *, dist: DistInfo,
          ckpt_dir: Path, config_hash: str, seed: int, tracker=None, resume: Checkpoint | None = None,
          collate: Callable | None = None, num_workers: int = 0, hflip: bool = False,
          stop_after: int | None = None, desc: str = "train") -> dict[str, Any]:
    """Run `cfg.steps` optimiser steps. Returns {'history', 'ema' (dict of EMA modules or {}), 'step'}."""
    modules, optimizers = recipe.modules(), recipe.optimizers()
    schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(cfg)) for k, o in optimizers.items()}
    ema = EMA(recipe.ema_modules(), cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay else None
    start, history = 0, []
    if resume is not None:
        load_checkpoint(resume, modules=modules, ema=ema.shadow if ema else {}, optimizers=optimizers,
                        schedulers=schedulers)
        start, history = resume.step, [h for h in resume.history if h["step"] <= resume.step]
        if ema:
            ema.updates = start
        if dist.is_main:  # a resumed run says so (a log, a Prefect UI): never a silent restart nor a silent resume
            print(f"aligntok: {desc}: resuming at step {start} of {cfg.steps} from {resume.path}", file=sys.stderr,
                  flush=True)
    cuda_fast_math(dist.device)
    wrapped: list[nn.parallel.DistributedDataParallel] = []
    if dist.world_size > 1:
        def ddp(m: nn.Module) -> nn.Module:
            wrapped.append(ddp_wrap(m, dist.device))
            return wrapped[-1]
        recipe.wrap(ddp)
    if cfg.batch_size % (dist.world_size * cfg.grad_accum):
        raise ValueError(f"batch_size {cfg.batch_size} must divide by world_size*grad_accum "
                         f"({dist.world_size}*{cfg.grad_accum})")
    # epochs count source images (a flipped copy is a variant, not another image); see StepBatches
    sampler = StepBatches(getattr(dataset, "num_source_images", len(dataset)), cfg.batch_size, cfg.steps, start,
                          seed, dist.rank, dist.world_size, group_sizes=getattr(dataset, "row_group_sizes", None),
                          variants=getattr(dataset, "num_variants", 1))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         collate_fn=collate, persistent_workers=False,
                                         pin_memory=dist.device.type == "cuda",  # lets _to copy asynchronously
                                         generator=torch.Generator().manual_seed(seed))  # keeps global RNG untouched
    run_id = tracker.run_id if tracker else None
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not dist.is_main, dynamic_ncols=True)
    window = LogWindow(dist.device)
    t0, seen = time.perf_counter(), 0
    step = start
    if start == 0 and dist.is_main and getattr(cfg, "probe_every", 0):  # the untrained model: the curve's baseline
        _probe(recipe, 0, history, tracker)
    for step, batch in enumerate(loader, start=start):
        batch = _to(batch, dist.device)
        # noise, timesteps and label drops come from (seed, rank, step) alone: ranks draw differently, and a
        # resumed run (on any world size) draws exactly what an uninterrupted one would
        torch.manual_seed(step_seed(seed, dist.rank, step))
        flip = torch.Generator().manual_seed(seed * 1_000_003 + step)
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        logs_acc: dict[str, torch.Tensor | float] = {}
        micros = _split(batch, cfg.grad_accum)
        for i, micro in enumerate(micros):
            if hflip:
                micro = _flip_half(micro, flip)
            # DDP all-reduces only on the last micro-batch: the earlier ones accumulate locally (no_sync)
            with _no_sync(wrapped, i < len(micros) - 1):
                with bf16_autocast(dist.device, cfg.amp):
                    losses, logs = recipe.losses(micro, step)
                total = sum(v for v in losses.values() if v is not None)
                window.add_losses(step, losses)
                (total / cfg.grad_accum).backward()
            accumulate(logs_acc, logs, cfg.grad_accum)
        for name, opt in optimizers.items():
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if params:  # the pre-clip norm, and with clipping on (grad_clip not 0/null) whether it fired
                logs_acc.update({f"{k}_{name}": v for k, v in clip_gradients(params, cfg.grad_clip).items()})
            opt.step()
            schedulers[name].step()
        if ema:
            ema.update(recipe.ema_modules())
        seen += cfg.batch_size
        window.add_logs(logs_acc)
        done = step + 1
        log_now = done % cfg.log_every == 0 or done == cfg.steps
        ckpt_now = done % cfg.ckpt_every == 0 or done == cfg.steps
        probe_every = getattr(cfg, "probe_every", 0)
        shown = done % cfg.image_every == 0 or (probe_every and done % probe_every == 0)
        if log_now or ckpt_now or shown:  # the same steps on every rank: the read all-reduces
            row, diverged = window.read(step, with_logs=log_now)
            if diverged:
                bar.close()  # ends the bar's line: the stop message is a line of its own
                raise _diverged(diverged, ckpt_dir)
        if log_now:
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            row.update({"lr": schedulers[next(iter(schedulers))].get_last_lr()[0], "img_per_s": rate})
            if dist.is_main:
                history.append({"step": done, **row})
                if tracker:
                    tracker.log_metrics(row, step=done)
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "img_per_s")})
        if dist.is_main and tracker and (done % cfg.image_every == 0 or done == cfg.steps):
            with torch.no_grad():
                grid = recipe.preview(batch, done)
            if grid is not None:
                tracker.log_image(grid, key=f"{desc}_preview", step=done)
        if dist.is_main and probe_every and (done % probe_every == 0 or done == cfg.steps):
            _probe(recipe, done, history, tracker)
        if ckpt_now:
            if dist.is_main:
                save_checkpoint(ckpt_dir, done, modules={k: unwrap(m) for k, m in modules.items()},
                                ema=ema.shadow if ema else {}, optimizers=optimizers, schedulers=schedulers,
                                state_hash=config_hash, run_id=run_id, history=history)
        bar.update(1)
        if stop_after is not None and done >= stop_after:
            bar.close()
            raise KeyboardInterrupt(f"stopped after step {done} (stop_after)")
    bar.close()
    return {"history": history, "ema": ema.shadow if ema else {}, "step": max(step + 1, start)}


def _diverged(d: Divergence, ckpt_dir: Path) -> TrainingDiverged:
    latest = ckpt_dir / "latest"
    last = ckpt_dir / latest.read_text().strip() if latest.exists() else None
    what = f"loss '{d.name}' is {d.value} at step {d.step}" if d.name else f"a loss on another rank is not finite " \
        f"by step {d.step}"
    return TrainingDiverged(f"{what}; stopped. Last good checkpoint kept: {last or 'none yet'}")


def _probe(recipe: Recipe, done: int, history: list[dict], tracker) -> None:
    """A measurement of the weights after `done` steps (touches no training state), logged at that step and kept in
    the history, so a resume keeps the curve."""
    scores = recipe.probe(done)
    if not scores:
        return
    if history and history[-1]["step"] == done:
        history[-1].update(scores)
    else:
        history.append({"step": done, **scores})
    if tracker:
        tracker.log_metrics(scores, step=done)


def _no_sync(wrapped: list[nn.Module], skip: bool) -> contextlib.ExitStack:
    """Every DDP module's no_sync() when `skip` (a micro-batch before the last), else nothing."""
    stack = contextlib.ExitStack()
    if skip:
        for m in wrapped:
            stack.enter_context(m.no_sync())
    return stack


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    return batch


def _split(batch, parts: int):
    if parts == 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        return list(batch.chunk(parts))
    pieces = [_split(b, parts) if isinstance(b, torch.Tensor) else [b] * parts for b in batch]
    return [type(batch)(p[i] for p in pieces) for i in range(parts)]


def _flip_half(batch, gen: torch.Generator):
    """Horizontally flip half the images (batch[0]), drawn from a per-step generator so resume is exact."""
    x = batch[0]
    mask = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device, non_blocking=True)  # no stream sync
    return (torch.where(mask[:, None, None, None], x.flip(-1), x), *batch[1:])
