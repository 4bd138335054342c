"""What the loop applies to the weights besides the optimiser step: the learning-rate schedule (linear warm-up,
then cosine or constant), gradient clipping and the EMA of the weights. Kept apart from the loop so that the
mutation tests (`make mutants`) cover these formulas without the loop's I/O around them."""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn

from aligntok.config import TrainConfig


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return f


def clip_gradients(params, max_norm: float | None) -> dict[str, torch.Tensor]:
    """Clip the gradients of `params` to total 2-norm `max_norm` in place (torch's clip_grad_norm_: scaled by
    max_norm / (norm + 1e-6) when that is below 1); 0 or None: left alone. Returns {'grad_norm': the norm before
    clipping} and, when clipping is on, {'clip_frac': 1.0 if it scaled the gradients else 0.0}: averaged over a log
    window, the fraction of steps where it fired. Both stay on the gradients' device (0-d tensors): reading them
    here would stall the GPU once a step; the loop reads a whole log window at once."""
    if not max_norm:
        return {"grad_norm": nn.utils.get_total_norm([p.grad for p in params]).detach()}
    norm = nn.utils.clip_grad_norm_(params, max_norm).detach()
    return {"grad_norm": norm, "clip_frac": (max_norm / (norm + 1e-6) < 1.0).to(norm.dtype)}


class EMA:
    def __init__(self, modules: dict[str, nn.Module], decay: float, warmup: bool):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.shadow = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module]) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        for k, m in modules.items():  # multi-tensor kernels on CUDA: a few launches, not one per tensor
            shadow, live = list(self.shadow[k].parameters()), [p.detach() for p in unwrap(m).parameters()]
            if shadow:
                torch._foreach_lerp_(shadow, live, 1 - d)
            shadow, live = list(self.shadow[k].buffers()), list(unwrap(m).buffers())
            if shadow:
                torch._foreach_copy_(shadow, live)


def unwrap(m: nn.Module) -> nn.Module:
    return m.module if hasattr(m, "module") else m
