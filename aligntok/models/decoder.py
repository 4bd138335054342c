"""LDM-style convolutional decoder (the VA-VAE f16d32 decoder family) and its building blocks."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def norm(channels: int) -> nn.GroupNorm:
    """LDM's GroupNorm: 32 groups for its widths (>= 128 channels). Narrower layers keep at least 4 channels per
    group: one channel per group (instance norm) would erase each channel's per-image mean, which is what carries
    an image's colour, and a small decoder then reconstructs grey images."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0 and (channels // g >= 4 or g == 1))
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1, self.conv1 = norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection (as in LDM)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM's asymmetric padding keeps exact halving


class MidBlock(nn.Sequential):
    def __init__(self, ch: int, attn: bool):
        super().__init__(ResBlock(ch, ch), AttnBlock(ch) if attn else nn.Identity(), ResBlock(ch, ch))


class Decoder(nn.Module):
    """z (B x latent_channels x h x w) -> image (B x out_channels x h*f x w*f), f = 2**(len(ch_mult)-1).

    attn_resolutions are strides relative to the output image (image px per feature px): VA-VAE's
    `attn_resolutions: [16]` at 256 px means attention on the 16x16 (stride-16) level, independent of size.
    """

    def __init__(self, latent_channels: int, out_channels: int = 3, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), upsample_factor: int = 16, mid_attn: bool = True):
        super().__init__()
        if 2 ** (len(ch_mult) - 1) != upsample_factor:
            raise ValueError(f"ch_mult {tuple(ch_mult)} upsamples {2 ** (len(ch_mult) - 1)}x, "
                             f"not upsample_factor={upsample_factor}")
        self.upsample_factor = upsample_factor
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(latent_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, mid_attn)
        levels = []
        stride = upsample_factor
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(block_in, block_out))
                block_in = block_out
                if stride in attn_resolutions:
                    blocks.append(AttnBlock(block_in))
            if level > 0:
                blocks.append(Upsample(block_in))
                stride //= 2
            levels.append(nn.Sequential(*blocks))
        self.up = nn.Sequential(*levels)
        self.norm_out = norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))
