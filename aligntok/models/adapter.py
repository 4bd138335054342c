"""The adapter A: foundation features (e.g. 1024-d DINOv2 tokens) -> the compact latent z0 (e.g. 32-d)."""
from __future__ import annotations

import torch
from torch import nn

from aligntok.models.decoder import ResBlock, norm


class Adapter(nn.Module):
    """Lightweight feature-to-latent map.

    hidden > 0: 1x1 projection to `hidden`, one 3x3 residual block (local mixing of neighbouring tokens),
    GroupNorm + SiLU, 1x1 projection to the latent. hidden == 0: a single 1x1 conv (LDM's quant_conv).
    The paper's adapter is deterministic (kl=False: the latent is the output itself); kl=True doubles the
    output channels into a Gaussian posterior (mean, logvar), as in the VAE baseline.
    """

    def __init__(self, in_channels: int, latent_channels: int, hidden: int = 512, kl: bool = False):
        super().__init__()
        self.kl = kl
        out = latent_channels * (2 if kl else 1)
        if hidden > 0:
            self.body = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), ResBlock(hidden, hidden), norm(hidden),
                                      nn.SiLU(), nn.Conv2d(hidden, out, 1))
        else:
            self.body = nn.Conv2d(in_channels, out, 1)

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.body(feat)
        if not self.kl:
            return h, None
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # LDM's DiagonalGaussianDistribution range
