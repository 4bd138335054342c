"""Per-image reconstruction metrics on [-1, 1] tensors (computed on the [0, 1] range)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float NCHW -> uint8 NCHW (round to nearest)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    a, b = (x.float() + 1) / 2, (y.float() + 1) / 2
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03, data range 1, per image.
    Images smaller than the window use a window the size of the image."""
    a, b = (x.float() + 1) / 2, (y.float() + 1) / 2
    c = a.shape[1]
    size = min(11, a.shape[-1], a.shape[-2])
    w = _gaussian_window(size).to(a)[None, None].repeat(c, 1, 1, 1)
    conv = lambda t: F.conv2d(t, w, groups=c)
    mu_a, mu_b = conv(a), conv(b)
    var_a = conv(a * a) - mu_a ** 2
    var_b = conv(b * b) - mu_b ** 2
    cov = conv(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)
