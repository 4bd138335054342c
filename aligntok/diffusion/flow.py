"""Flow matching on a linear path, LightningDiT's convention: x_t = t * x1 + (1 - t) * x0, with x0 ~ N(0, I) the
noise (t = 0) and x1 the data (t = 1). The model predicts the velocity x1 - x0."""
from __future__ import annotations

import torch


def sample_timesteps(n: int, *, kind: str = "lognormal", mean: float = 0.0, std: float = 1.0,
                     generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """'lognormal' (logit-normal): sigmoid(N(mean, std)), as LightningDiT's use_lognorm; 'uniform': U(0, 1)."""
    if kind == "lognormal":
        return torch.sigmoid(torch.randn(n, generator=generator) * std + mean).to(device)
    if kind == "uniform":
        return torch.rand(n, generator=generator).to(device)
    raise ValueError(f"timestep sampling: given {kind!r}; expected 'lognormal' or 'uniform'")


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """LightningDiT's sampler shift: t' = s*t / (1 + (s-1)*t). Endpoints stay fixed; s < 1 moves the grid toward
    t=0 (noise), so more steps go to the noisy end. shift <= 0 means no shift (as in the reference)."""
    if shift <= 0:
        return t
    return shift * t / (1 + (shift - 1) * t)


class FlowMatching:
    def __init__(self, timestep_sampling: str = "lognormal", use_cosine_loss: bool = True, cosine_weight: float = 1.0):
        self.timestep_sampling, self.use_cosine_loss, self.cosine_weight = timestep_sampling, use_cosine_loss, cosine_weight

    def loss(self, model, x1: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None):
        """MSE on the velocity (mean over all elements) plus, as LightningDiT's use_cosine_loss, 1 - cos(v_pred,
        v_target) over the channel dimension, averaged."""
        t = sample_timesteps(x1.shape[0], kind=self.timestep_sampling, generator=generator, device=x1.device)
        x0 = torch.randn(x1.shape, generator=generator).to(x1) if generator is not None else torch.randn_like(x1)
        tb = t.view(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
        xt = tb * x1 + (1 - tb) * x0
        target = x1 - x0
        pred = model(xt, t, y)
        mse = (pred.float() - target.float()).pow(2).mean()
        logs = {"mse": float(mse.detach())}
        loss = mse
        if self.use_cosine_loss:
            cos = 1 - torch.nn.functional.cosine_similarity(pred.float(), target.float(), dim=1).mean()
            loss = loss + self.cosine_weight * cos
            logs["cos_loss"] = float(cos.detach())
        return loss, logs
