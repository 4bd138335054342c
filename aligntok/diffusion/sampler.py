"""ODE sampling from noise (t=0) to data (t=1) with Euler or Heun, classifier-free guidance, LightningDiT's
guidance interval and timestep shift.

`steps` is the number of integration intervals (model evaluations: Euler 1 per interval, Heun 2). The grid is
linspace(0, 1, steps + 1), then shifted as LightningDiT's `ode` does: t' = s t / (1 + (s - 1) t) for s > 0
(see flow.shift_timesteps). LightningDiT's `num_sampling_steps: 250` is 250 grid points, i.e. steps=249 here.

Guidance interval: guidance applies where cfg_interval_start <= t < 1. LightningDiT's forward_with_cfg skips
guidance for t < cfg_interval_start, i.e. guides t >= start, so start=0 guides every evaluation, as there.
We also leave t == 1 unguided so that start=1.0 switches guidance off entirely; only Heun ever evaluates at
t == 1 (its last corrector), the one place where this differs from the reference.
"""
from __future__ import annotations

from typing import Callable

import torch

from aligntok.diffusion.flow import shift_timesteps


def combine_cfg(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float, cfg_channels: int | None) -> torch.Tensor:
    """v = v_u + s (v_c - v_u). An int cfg_channels guides only the first channels and keeps the conditional
    output elsewhere: GLIDE/DiT/LightningDiT guide 3 channels "for exact reproducibility" (hustvl/LightningDiT
    #21), reproduced on purpose. None guides all channels.

    Computed in at least fp32: under bf16 autocast the model outputs are bf16, and at a scale of 10 the bf16
    rounding of (cond - uncond) would be amplified 10x at every guided step (LightningDiT samples in fp32)."""
    dtype = torch.promote_types(cond.dtype, torch.float32)
    cond, uncond = cond.to(dtype), uncond.to(dtype)
    guided = uncond + cfg_scale * (cond - uncond)
    if cfg_channels is None:
        return guided
    return torch.cat([guided[:, :cfg_channels], cond[:, cfg_channels:]], dim=1)


def cfg_active(t: float, cfg_scale: float, cfg_interval_start: float) -> bool:
    return cfg_scale != 1.0 and cfg_interval_start <= t < 1.0


def guided_velocity(model_fn: Callable, x: torch.Tensor, t: float, y: torch.Tensor, *, cfg_scale: float,
                    cfg_channels: int | None, cfg_interval_start: float, null_class: int | None) -> torch.Tensor:
    """Velocity at scalar time t: one conditional pass outside guidance, else one batched cond+null pass."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
    if not cfg_active(t, cfg_scale, cfg_interval_start):
        return model_fn(x, tt, y)
    if null_class is None:
        raise ValueError("classifier-free guidance (cfg_scale != 1) needs null_class, the model's null label index")
    both = model_fn(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, null_class)]))
    cond, uncond = both.chunk(2)
    return combine_cfg(cond, uncond, cfg_scale, cfg_channels)


def time_grid(steps: int, timestep_shift: float = 0.0) -> list[float]:
    if steps < 1:
        raise ValueError(f"sample.steps: given {steps}; expected >= 1")
    return shift_timesteps(torch.linspace(0, 1, steps + 1, dtype=torch.float64), timestep_shift).tolist()


@torch.no_grad()
def sample(model_fn: Callable, noise: torch.Tensor, y: torch.Tensor, *, steps: int, method: str = "euler",
           cfg_scale: float = 1.0, cfg_channels: int | None = None, cfg_interval_start: float = 0.0,
           timestep_shift: float = 0.0, null_class: int | None = None) -> torch.Tensor:
    """Integrate dx/dt = v(x, t, y) from x(0) = noise to t = 1; model_fn(x, t, y) -> velocity, t a (B,) tensor."""
    if method not in ("euler", "heun"):
        raise ValueError(f"sample.method: given {method!r}; expected 'euler' or 'heun'")

    def v(x, t):
        return guided_velocity(model_fn, x, t, y, cfg_scale=cfg_scale, cfg_channels=cfg_channels,
                               cfg_interval_start=cfg_interval_start, null_class=null_class)

    grid = time_grid(steps, timestep_shift)
    x = noise
    for t0, t1 in zip(grid[:-1], grid[1:]):
        h = t1 - t0
        d0 = v(x, t0)
        if method == "heun":
            x = x + 0.5 * h * (d0 + v(x + h * d0, t1))
        else:
            x = x + h * d0
    return x
