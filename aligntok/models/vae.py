"""The from-scratch VAE baseline encoder: an LDM-style convolutional down path (VA-VAE f16d32 family)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aligntok.models.decoder import AttnBlock, Downsample, MidBlock, ResBlock, norm


class ConvEncoder(nn.Module):
    """x in [-1, 1], Bx3xHxW -> B x out_channels x H/f x W/f, f = 2**(len(ch_mult)-1).

    out_channels defaults to 2 * latent (LDM's `double_z`); the tokenizer's 1x1 adapter (LDM's quant_conv)
    then splits it into mean and log-variance. attn_resolutions are strides, as in `Decoder`.
    """

    def __init__(self, image_size: int, out_channels: int, in_channels: int = 3, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), mid_attn: bool = True):
        super().__init__()
        factor = 2 ** (len(ch_mult) - 1)
        if image_size % factor:
            raise ValueError(f"image_size {image_size} is not a multiple of the downsampling factor {factor}")
        self.out_channels = out_channels
        self.grid_size = image_size // factor
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        block_in, stride, levels = ch, 1, []
        for level, mult in enumerate(ch_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(block_in, ch * mult))
                block_in = ch * mult
                if stride in attn_resolutions:
                    blocks.append(AttnBlock(block_in))
            if level < len(ch_mult) - 1:
                blocks.append(Downsample(block_in))
                stride *= 2
            levels.append(nn.Sequential(*blocks))
        self.down = nn.Sequential(*levels)
        self.mid = MidBlock(block_in, mid_attn)
        self.norm_out = norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))
