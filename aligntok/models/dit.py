"""LightningDiT: a DiT with SwiGLU, RMSNorm, 2D RoPE, optional QK-norm and adaLN-Zero (hustvl/LightningDiT).

Time convention (LightningDiT's): t=0 is pure noise, t=1 is data; the model predicts the velocity x1 - x0.
The absolute 2D sin-cos position embedding is kept beside RoPE, as the reference does, but as a non-persistent
buffer rather than a frozen nn.Parameter, so parameters() holds exactly the reference's trainable set
(XL/1 at 16x16x32, 1000 classes: 674,961,824; the reference's parameters() also counts its frozen pos_embed,
+294,912 = 675,256,736). The null class row of the label table always exists (the reference drops it when
class_dropout_prob == 0), so CFG works with any dropout setting.
"""
from __future__ import annotations

import math
from functools import cache, partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from aligntok.diffusion.sampler import combine_cfg


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        """x * rsqrt(mean(x^2) + eps) * weight, in the reference's order. Same dtype as the weight (fp32 training):
        one op, no casts. Lower-precision x (autocast): normalised in fp32, cast back, then scaled by the fp32
        weight, exactly as the reference does."""
        if x.dtype == self.weight.dtype:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, None, self.eps).type_as(x) * self.weight


def norm_layer(use_rmsnorm: bool) -> Callable[[int], nn.Module]:
    """The norm of a block: RMSNorm with a learned scale, or LayerNorm without an affine (the original DiT's)."""
    return RMSNorm if use_rmsnorm else partial(nn.LayerNorm, elementwise_affine=False, eps=1e-6)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class GeluMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def rope_angles(grid: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Axial 2D RoPE angles (grid*grid, head_dim/2): half the rotated pairs encode the row, half the column."""
    quarter = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    ang = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)
    return ang.float()


def rope_table(angles: torch.Tensor) -> torch.Tensor:
    """(N, P) rotation angles -> (N, P, 2) [cos, sin]: the table apply_rope uses (computed once per model)."""
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor | None = None, *, table: torch.Tensor | None = None,
               token_dim: int = -2) -> torch.Tensor:
    """Rotate consecutive channel pairs (2i, 2i+1) of x (..., D) by the angles (N, <=D/2) of its token, with N at
    `token_dim` of x; channels beyond the rotated ones pass through. The reference's layout (EVA's interleaved
    rotate_half). `table` (rope_table(angles)) skips recomputing cos/sin.

    float32/64: one complex multiply per pair, (x_2i + i x_2i+1) * (cos + i sin), one kernel forward and one
    backward instead of the reference's neg/stack/mul/mul/add; lower precisions (no complex type): swap each
    pair and combine as x * [cos, cos] + swapped * [-sin, sin] (also under torch.compile, which fuses that real
    form into one kernel)."""
    if table is None:
        table = rope_table(angles)
    n_tok, pairs = table.shape[0], table.shape[1]
    n_rot = 2 * pairs
    xr = x if n_rot == x.shape[-1] else x[..., :n_rot]
    token_dim = token_dim % x.dim()
    shape = [1] * (x.dim() - 1)
    shape[token_dim] = n_tok
    if x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling():
        rot = torch.view_as_complex(table.to(x.dtype)).view(*shape, pairs)
        out = torch.view_as_real(torch.view_as_complex(xr.unflatten(-1, (pairs, 2))) * rot).flatten(-2)
    else:
        cos, sin = table.to(x.dtype).unbind(-1)
        c = torch.stack([cos, cos], dim=-1).view(*shape, n_rot)
        s = torch.stack([-sin, sin], dim=-1).view(*shape, n_rot)
        out = torch.addcmul(xr * c, xr.unflatten(-1, (pairs, 2)).flip(-1).flatten(-2), s)
    return out if n_rot == x.shape[-1] else torch.cat([out, x[..., n_rot:]], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention. `heads_qkv` and `merge_heads` are its two halves, so that a joint attention over
    several token streams (models/t2i_dit.py) can project each stream with its own weights and attend once."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qk_norm = qk_norm
        self.q_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope: torch.Tensor | None):
        """rope: rope_table(...) of shape (N, pairs, 2), or None."""
        return self.merge_heads(F.scaled_dot_product_attention(*self.heads_qkv(x, rope)))

    def heads_qkv(self, x, rope: torch.Tensor | None):
        """q, k, v of x (B, N, dim), each (B, heads, N, head_dim): QK-normed, q and k rotated by `rope`."""
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, self.head_dim)
        if torch.compiler.is_compiling():
            # compiled: the reference's layout, RoPE fused by inductor into the (B, heads, N, D) tensors the attention
            # gets (B/1, one thread: 0.99x the compiled reference's step vs 0.97x rotating in the qkv layout, a
            # difference within the runs' spread; eager, the in-place form below is the faster one)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = apply_rope(q, table=rope, token_dim=2), apply_rope(k, table=rope, token_dim=2)
            return q, k, v
        # eager: split, not slicing: its backward writes both gradients into one buffer (slices' backward
        # zero-fills a full-size buffer for each and adds them)
        qk, v = qkv.split([2, 1], dim=2)
        if self.qk_norm:
            qk = torch.stack([self.q_norm(qk[:, :, 0]), self.k_norm(qk[:, :, 1])], dim=2)
        if rope is not None:  # q and k rotated together, in their (B, N, 2, heads, D) layout: no copies before it
            qk = apply_rope(qk, table=rope, token_dim=1)
        q, k = qk.permute(2, 0, 3, 1, 4)
        return q, k, v.squeeze(2).transpose(1, 2)

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) attention output -> (B, N, dim), projected."""
        b, _, n, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


def modulate(x, shift, scale):
    """x * (1 + scale) + shift as one fused multiply-add over the tokens."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, qk_norm, use_swiglu, use_rmsnorm):
        super().__init__()
        norm = norm_layer(use_rmsnorm)
        self.norm1, self.norm2 = norm(dim), norm(dim)
        self.attn = Attention(dim, heads, qk_norm, norm)
        hidden = int(dim * mlp_ratio)
        self.mlp = SwiGLU(dim, int(2 / 3 * hidden)) if use_swiglu else GeluMLP(dim, hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = torch.addcmul(x, gate1.unsqueeze(1), self.attn(modulate(self.norm1(x), shift1, scale1), rope))
        return torch.addcmul(x, gate2.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift2, scale2)))


def final_layer(model: nn.Module, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    shift, scale = model.final_modulation(c).chunk(2, dim=1)
    return model.final_linear(modulate(model.norm_final(tokens), shift, scale))


def unpatchify(out: torch.Tensor, patch: int, grid: int, channels: int) -> torch.Tensor:
    """(B, grid*grid, patch*patch*channels) tokens -> (B, channels, grid*patch, grid*patch) latents."""
    b = out.shape[0]
    out = out.view(b, grid, grid, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(b, channels, grid * patch, grid * patch)


def init_dit_weights(model: nn.Module, small: list[torch.Tensor], zero: list[nn.Linear]) -> None:
    """LightningDiT's initialisation: xavier-uniform Linears with zero biases, the patch embedding as one Linear,
    the embedding weights `small` from N(0, 0.02^2) (in that order), and adaLN-Zero: the `zero` layers (each
    block's modulation) and the final layer at zero, so that every block starts as the identity, the output as 0."""
    def basic(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    model.apply(basic)
    w = model.x_embedder.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.bias)
    for weight in small:
        nn.init.normal_(weight, std=0.02)
    for layer in [*zero, model.final_modulation[-1], model.final_linear]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


@cache
def compiled_fn(fn: Callable, mode: str | None) -> Callable:
    return torch.compile(fn, mode=mode)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)
    pos = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(pos, pos, indexing="ij")
    return torch.cat([one_d(dim // 2, gx), one_d(dim // 2, gy)], dim=1).float()


class LightningDiT(nn.Module):
    def __init__(self, input_size: int, in_channels: int, num_classes: int, patch_size: int, hidden_size: int,
                 depth: int, num_heads: int, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 qk_norm: bool = False, use_swiglu: bool = True, use_rmsnorm: bool = True, use_rope: bool = True,
                 learn_sigma: bool = False):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"latent size {input_size} is not divisible by patch size {patch_size}")
        self.in_channels, self.num_classes, self.patch_size = in_channels, num_classes, patch_size
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        self.class_dropout_prob = class_dropout_prob
        self.grid = input_size // patch_size
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)  # index num_classes = null class (CFG)
        self.register_buffer("pos_embed", sincos_2d(hidden_size, self.grid)[None], persistent=False)
        rope = rope_table(rope_angles(self.grid, hidden_size // num_heads // 2 * 2)) if use_rope else None
        self.register_buffer("rope", rope, persistent=False)  # (N, pairs, 2): cos, sin of each rotated pair
        self.blocks = nn.ModuleList([Block(hidden_size, num_heads, mlp_ratio, qk_norm, use_swiglu, use_rmsnorm)
                                     for _ in range(depth)])
        self.norm_final = norm_layer(use_rmsnorm)(hidden_size)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        # recompute each block's activations in backward instead of storing them (training only): trades about
        # one extra forward for a per-block activation footprint, for larger per-GPU batches
        self.grad_checkpointing = False
        self.compile_mode: str | None = None  # set by compile_blocks
        self.compiled = False
        self.initialize_weights()

    def compile_blocks(self, mode: str | None = None) -> None:
        """Run every block through one torch.compile'd Block.forward (identical blocks share one graph), and the
        final layer through another.

        Only a flag is stored: parameter names and state_dict keys stay the eager model's, and a deepcopy (the
        EMA) gets its own parameters rather than a compiled wrapper bound to this model's blocks."""
        self.compile_mode, self.compiled = mode, True

    def initialize_weights(self):
        init_dit_weights(self, [self.y_embedder.weight, self.t_embedder[0].weight, self.t_embedder[2].weight],
                         [blk.adaLN_modulation[-1] for blk in self.blocks])

    def drop_labels(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.class_dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.class_dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return y

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(timestep_embedding(t)) + self.y_embedder(self.drop_labels(y))
        run = compiled_fn(Block.forward, self.compile_mode) if self.compiled else Block.__call__
        final = compiled_fn(final_layer, self.compile_mode) if self.compiled else final_layer
        remat = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            if remat:  # non-reentrant: works with DDP, autocast and inputs that need no grad
                tokens = checkpoint(run, blk, tokens, c, self.rope, use_reentrant=False)
            else:
                tokens = run(blk, tokens, c, self.rope)
        return unpatchify(final(self, tokens, c), self.patch_size, self.grid, self.out_channels)[:, : self.in_channels]

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         cfg_channels: int | None = None) -> torch.Tensor:
        """Guided velocity for a batch of B conditional inputs: the null-label half is built here (one 2B pass),
        unlike the reference, whose caller passes [x, x] and [y, null]. Returns B outputs. cfg_channels=3 is
        the reference's default (guidance on the first 3 channels only); None guides every channel."""
        both = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.num_classes)]))
        cond, uncond = both.chunk(2)
        return combine_cfg(cond, uncond, cfg_scale, cfg_channels)


SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12)}
DIT_MODELS: dict[str, Callable[..., LightningDiT]] = {
    f"LightningDiT-{name}/{p}": partial(LightningDiT, depth=d, hidden_size=hs, num_heads=nh, patch_size=p)
    for name, (d, hs, nh) in SIZES.items() for p in (1, 2)
}
DIT_MODELS["tiny"] = partial(LightningDiT, depth=4, hidden_size=128, num_heads=4, patch_size=1)
DIT_MODELS["tiny/2"] = partial(LightningDiT, depth=4, hidden_size=128, num_heads=4, patch_size=2)  # 8x8 latents -> 16 tokens


def build_dit(name: str, input_size: int, in_channels: int, num_classes: int, **overrides) -> LightningDiT:
    if name not in DIT_MODELS:
        raise ValueError(f"dit.model: given {name!r}; expected one of {sorted(DIT_MODELS)}")
    return DIT_MODELS[name](input_size=input_size, in_channels=in_channels, num_classes=num_classes, **overrides)
