"""ODE sampling from noise (t=0) to data (t=1) with Euler or Heun, classifier-free guidance and LightningDiT's
guidance interval and timestep shift.

`steps` is the number of integration intervals (model calls per interval: Euler 1, Heun 2). LightningDiT's `num_sampling_steps: 250` is a grid of 250 points, i.e. 249 intervals.
"""
from __future__ import annotations

from typing import Callable

import torch

from aligntok.diffusion.flow import shift_timesteps


def guided_velocity(model_fn: Callable, x: torch.Tensor, t: float, y: torch.Tensor, *, cfg_scale: float,
                    cfg_channels: int | None, cfg_interval_start: float, null_class: int | None) -> torch.Tensor:
    """v = v_u + s (v_c - v_u), only where t >= cfg_interval_start (LightningDiT: no guidance for t < start, i.e.
    near the noise end). cfg_channels=int guides only the first channels (the GLIDE/DiT/LightningDiT 3-channel
    behaviour, hustvl/LightningDiT#21); None guides all. Scale 1 (or outside the interval) is one conditional pass."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
    if cfg_scale == 1.0 or t < cfg_interval_start:
        return model_fn(x, tt, y)
    if null_class is None:
        raise ValueError("classifier-free guidance needs the null class index")
    both = model_fn(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, null_class)]))
    cond, uncond = both.chunk(2)
    guided = uncond + cfg_scale * (cond - uncond)
    if cfg_channels is None:
        return guided
    return torch.cat([guided[:, :cfg_channels], cond[:, cfg_channels:]], dim=1)


@torch.no_grad()
def sample(model_fn: Callable, noise: torch.Tensor, y: torch.Tensor, *, steps: int, method: str = "euler",
           cfg_scale: float = 1.0, cfg_channels: int | None = None, cfg_interval_start: float = 0.0,
           timestep_shift: float = 0.0, null_class: int | None = None) -> torch.Tensor:
    if method not in ("euler", "heun"):
        raise ValueError(f"sample.method: given {method!r}; expected 'euler' or 'heun'")
    grid = shift_timesteps(torch.linspace(0, 1, steps + 1, dtype=torch.float64), timestep_shift).tolist()
    v = lambda x, t: guided_velocity(model_fn, x, t, y, cfg_scale=cfg_scale, cfg_channels=cfg_channels,
                                     cfg_interval_start=cfg_interval_start, null_class=null_class)
    x = noise
    for t0, t1 in zip(grid[:-1], grid[1:]):
        h = t1 - t0
        d0 = v(x, t0)
        if method == "heun":
            x_pred = x + h * d0
            x = x + h * 0.5 * (d0 + v(x_pred, t1))
        else:
            x = x + h * d0
    return x
