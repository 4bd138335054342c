"""Flow matching on a linear path, LightningDiT's convention: x_t = t * x1 + (1 - t) * x0, with x0 ~ N(0, I) the
noise (t = 0) and x1 the data (t = 1). The model predicts the velocity dx_t/dt = x1 - x0."""
from __future__ import annotations

import torch
import torch.nn.functional as F

T_EPS = 1e-6  # keeps t strictly inside (0, 1): float32 sigmoid saturates to 1.0 and rand() can return 0.0


def sample_timesteps(n: int, *, kind: str = "lognormal", mean: float = 0.0, std: float = 1.0,
                     generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """'lognormal' (logit-normal, LightningDiT's use_lognorm): sigmoid(N(mean, std)); 'uniform': U(0, 1)."""
    gen_device = generator.device if generator is not None else device
    if kind == "lognormal":
        t = torch.sigmoid(torch.randn(n, generator=generator, device=gen_device) * std + mean)
    elif kind == "uniform":
        t = torch.rand(n, generator=generator, device=gen_device)
    else:
        raise ValueError(f"timestep sampling: given {kind!r}; expected 'lognormal' or 'uniform'")
    return t.clamp(T_EPS, 1 - T_EPS).to(device)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """LightningDiT's sampler shift (transport/integrators.py `ode`), in its t=0-noise convention:
        t' = s t / (1 + (s - 1) t),  applied only when s > 0 (s <= 0: no shift).
    t'(0) = 0, t'(1) = 1, monotone increasing for s > 0. s < 1 pulls the grid toward t = 0 (noise), so more
    steps are spent at the noisy end; s = 1 is the identity. In the t=1-noise convention of SD3/FLUX
    (tau = 1 - t) the same map is tau' = (1/s) tau / (1 + (1/s - 1) tau), i.e. their shift is 1/s."""
    if shift <= 0:
        return t
    return shift * t / (1 + (shift - 1) * t)


class FlowMatching:
    def __init__(self, timestep_sampling: str = "lognormal", use_cosine_loss: bool = True, cosine_weight: float = 1.0,
                 lognormal_until: int | None = None):
        self.timestep_sampling, self.use_cosine_loss, self.cosine_weight = timestep_sampling, use_cosine_loss, cosine_weight
        self.lognormal_until = lognormal_until

    def sampling_at(self, step: int | None) -> str:
        """The t distribution of training step `step` (0-based): uniform from step `lognormal_until` on, LightningDiT's
        use_lognorm switched off mid-way through a long run; otherwise `timestep_sampling`."""
        if self.lognormal_until is not None and step is not None and step >= self.lognormal_until:
            return "uniform"
        return self.timestep_sampling

    def loss(self, model, x1: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
             step: int | None = None):
        """(loss, logs). loss = mean((v - (x1 - x0))^2) + cosine_weight * mean(1 - cos(v, x1 - x0)), the cosine
        taken over the channel dim at each position, as LightningDiT's use_cosine_loss."""
        n = x1.shape[0]
        t = sample_timesteps(n, kind=self.sampling_at(step), generator=generator, device=x1.device)
        gen_device = generator.device if generator is not None else x1.device
        x0 = torch.randn(x1.shape, generator=generator, device=gen_device).to(x1)
        tb = t.to(x1.dtype).view(-1, *([1] * (x1.dim() - 1)))
        xt = tb * x1 + (1 - tb) * x0
        target = (x1 - x0).float()
        pred = model(xt, t, y).float()
        mse = (pred - target).pow(2).mean()
        logs = {"mse": mse.detach()}
        loss = mse
        if self.use_cosine_loss:
            cos = (1 - F.cosine_similarity(pred, target, dim=1)).mean()
            loss = loss + self.cosine_weight * cos
            logs["cos_loss"] = cos.detach()
        return loss, logs
