"""Text-conditioned LightningDiT: joint attention over image and caption tokens (SD3's MMDiT design), each stream
with its own weights, one attention over both. The blocks are the class model's (models/dit.py): SwiGLU, RMSNorm,
QK-norm, adaLN-Zero, sin-cos + 2-D RoPE on the image tokens; the same flow matching, sampler, CFG interval and shift.

Why joint attention, not PixArt's cross-attention:
- Evidence. SD3 (Esser et al. 2024) compared, in one controlled setting, a shared-weight DiT over concatenated
  tokens, a cross-attention DiT, UViT and MMDiT; MMDiT had the best validation loss, CLIP score and FID. The
  peers that compare latent spaces for text-to-image train joint attention: fuse-dit's baseline (`attention:
  self`, 256 px, kept by the REPA-E fork that compares the FLUX VAE with a tuned VAE, the comparison this task
  reproduces) and SVG-T2I's 2.6B single-stream DiT (Lumina-Image 2.0's).
- Reuse. Each stream holds a models/dit.py Block's weights and calls its attention halves; the only new op is one
  masked attention over the concatenated keys. With no caption tokens the image stream is exactly dit.Block.
- Compute at 256 px (N = 256 image tokens, L caption tokens, width d): a block costs ~12 d^2 (N + L) + 2 d (N + L)^2
  multiply-adds against 14 d^2 N + 2 d^2 L + 2 d N (N + L) for a cross-attention block. At d = 1536 that is 1.08x
  the cross-attention block at L = 77, 1.19x at L = 120, 1.62x at L = 300 (1.31x / 1.49x / 2.24x the class
  block). Captions are padded to the encoder's length, but a batch only runs up to its longest caption: columns
  that are padding in every row are dropped before the blocks, so short captions cost what they are.
- Parameters. Two streams double a block: SD3-medium's shape (depth 24, width 1536) is ~2.0B here, against 1.25B
  for cross-attention blocks (self 4 d^2 + cross 4 d^2 + SwiGLU 8 d^2 + adaLN 6 d^2) of the same shape; the text
  weights cost compute per caption token only.

Caption input: the frozen encoder's last hidden states (B, L, text_dim) and its attention mask (B, L), True for a
token. The tokens are normalised (a decoder LLM's states reach large norms; the norm makes the input scale the
encoder's business no longer) and projected by an MLP; their masked mean, through its own MLP, is added to the
timestep embedding (SD3's pooled vector). Padding is zeroed and masked out of every attention as a key, so a padded
token changes no output; padded queries only feed the text stream's own padded rows, which nothing reads.

Positions: 2-D RoPE (and the sin-cos embedding) on the image tokens only; caption tokens get none. The encoder's
states already carry word order (T5's relative bias, CLIP's and Gemma's positions); SD3 gives text no position and
FLUX's text ids are all zero (the identity rotation). So dropping padding columns anywhere changes nothing.
fuse-dit found 1-D text + 2-D image RoPE best when text is read from inside an LLM: an ablation, not the default.

CFG: caption dropout (caption_dropout_prob in training, or an explicit `drop` mask) replaces a row's caption, before
the norm, by a learned null sequence of `null_len` tokens in the encoder's space (mask True for those, False for the
rest of the row), as PixArt's learned caption embedding (its 120 tokens, the full T5 length; SD3's pipeline encodes
an empty prompt instead). Default null_len = 1: without text positions a set of null tokens has no order, and more
would only give the unconditional branch spare capacity. forward_with_cfg runs the caption and the null as one
doubled batch, applies guidance inside the sampler's interval, and combines in float32 (sampler.combine_cfg).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from aligntok.diffusion.sampler import cfg_active, combine_cfg
from aligntok.models.dit import (Block, compiled_fn, final_layer, init_dit_weights, modulate, norm_layer,
                                 rope_angles, rope_table, sincos_2d, timestep_embedding, unpatchify)


class TextKV(nn.Module):
    """The last block's caption stream: keys and values only (no caption output is read after the last block,
    so it has no queries, output projection or MLP: SD3's context_pre_only)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, use_rmsnorm: bool):
        super().__init__()
        norm = norm_layer(use_rmsnorm)
        self.heads = heads
        self.norm1 = norm(dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.k_norm = norm(dim // heads) if qk_norm else nn.Identity()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, txt: torch.Tensor, c: torch.Tensor):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        b, n, d = txt.shape
        kv = self.kv(modulate(self.norm1(txt), shift, scale)).view(b, n, 2, self.heads, d // self.heads)
        k, v = kv.permute(2, 0, 3, 1, 4)
        return self.k_norm(k), v


def _residuals(blk: Block, x, attn_out, gate1, shift2, scale2, gate2):
    """The rest of a dit.Block after its attention: gated attention residual, then the gated MLP residual."""
    x = torch.addcmul(x, gate1.unsqueeze(1), blk.attn.merge_heads(attn_out))
    return torch.addcmul(x, gate2.unsqueeze(1), blk.mlp(modulate(blk.norm2(x), shift2, scale2)))


class JointBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, qk_norm, use_swiglu, use_rmsnorm, text_out: bool):
        super().__init__()
        self.image = Block(dim, heads, mlp_ratio, qk_norm, use_swiglu, use_rmsnorm)
        self.text = (Block(dim, heads, mlp_ratio, qk_norm, use_swiglu, use_rmsnorm) if text_out
                     else TextKV(dim, heads, qk_norm, use_rmsnorm))

    def forward(self, img, txt, c, rope, key_mask):
        """img (B, N, d), txt (B, L, d), key_mask (B, 1, 1, N + L) True where a key is attended, or None for
        all. Returns (img, txt); txt is None after the last block."""
        shift1, scale1, *img_rest = self.image.adaLN_modulation(c).chunk(6, dim=1)
        qi, ki, vi = self.image.attn.heads_qkv(modulate(self.image.norm1(img), shift1, scale1), rope)
        if isinstance(self.text, TextKV):
            kt, vt = self.text(txt, c)
            q = qi
        else:
            tshift1, tscale1, *txt_rest = self.text.adaLN_modulation(c).chunk(6, dim=1)
            qt, kt, vt = self.text.attn.heads_qkv(modulate(self.text.norm1(txt), tshift1, tscale1), None)
            q = torch.cat([qi, qt], dim=2)
        out = F.scaled_dot_product_attention(q, torch.cat([ki, kt], dim=2), torch.cat([vi, vt], dim=2),
                                             attn_mask=key_mask)
        n = img.shape[1]
        img = _residuals(self.image, img, out[:, :, :n], *img_rest)
        if isinstance(self.text, TextKV):
            return img, None
        return img, _residuals(self.text, txt, out[:, :, n:], *txt_rest)


class TextLightningDiT(nn.Module):
    def __init__(self, input_size: int, in_channels: int, text_dim: int, patch_size: int, hidden_size: int,
                 depth: int, num_heads: int, mlp_ratio: float = 4.0, caption_dropout_prob: float = 0.1,
                 null_len: int = 1, qk_norm: bool = True, use_swiglu: bool = True, use_rmsnorm: bool = True,
                 use_rope: bool = True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"latent size {input_size} is not divisible by patch size {patch_size}")
        if null_len < 1:
            raise ValueError(f"null_len: given {null_len}; expected >= 1")
        self.in_channels, self.out_channels, self.patch_size = in_channels, in_channels, patch_size
        self.text_dim, self.caption_dropout_prob = text_dim, caption_dropout_prob
        self.grid = input_size // patch_size
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.text_norm = norm_layer(use_rmsnorm)(text_dim)
        self.text_embedder = nn.Sequential(nn.Linear(text_dim, hidden_size), nn.GELU(approximate="tanh"),
                                           nn.Linear(hidden_size, hidden_size))
        self.pooled_embedder = nn.Sequential(nn.Linear(text_dim, hidden_size), nn.SiLU(),
                                             nn.Linear(hidden_size, hidden_size))
        self.null_text = nn.Parameter(torch.empty(null_len, text_dim))  # the learned null caption (CFG)
        self.register_buffer("pos_embed", sincos_2d(hidden_size, self.grid)[None], persistent=False)
        rope = rope_table(rope_angles(self.grid, hidden_size // num_heads // 2 * 2)) if use_rope else None
        self.register_buffer("rope", rope, persistent=False)
        self.blocks = nn.ModuleList([JointBlock(hidden_size, num_heads, mlp_ratio, qk_norm, use_swiglu, use_rmsnorm,
                                                text_out=i < depth - 1) for i in range(depth)])
        self.norm_final = norm_layer(use_rmsnorm)(hidden_size)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self.grad_checkpointing = False  # as LightningDiT.grad_checkpointing
        self.compile_mode: str | None = None
        self.compiled = False
        self.initialize_weights()

    def compile_blocks(self, mode: str | None = None) -> None:
        """As LightningDiT.compile_blocks: a flag; parameter names and state_dict keys stay the eager model's."""
        self.compile_mode, self.compiled = mode, True

    def initialize_weights(self):
        small = [emb[i].weight for emb in (self.t_embedder, self.text_embedder, self.pooled_embedder) for i in (0, 2)]
        init_dit_weights(self, small, [m for blk in self.blocks for m in (blk.image.adaLN_modulation[-1],
                                                                          blk.text.adaLN_modulation[-1])])
        nn.init.normal_(self.null_text)  # unit scale, as the normalised caption tokens it stands in for

    def drop_captions(self, text: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor | None):
        """Rows where `drop` is True get the null caption: null_text in the first null_len positions (mask True),
        padding after. drop=None: drawn with caption_dropout_prob in training, none in eval."""
        if drop is None:
            if not (self.training and self.caption_dropout_prob > 0):
                return text, mask
            drop = torch.rand(text.shape[0], device=text.device) < self.caption_dropout_prob
        n_null, length = self.null_text.shape[0], text.shape[1]
        if length < n_null:  # room for the null caption; the added columns are padding
            text, mask = F.pad(text, (0, 0, 0, n_null - length)), F.pad(mask, (0, n_null - length))
            length = n_null
        null = F.pad(self.null_text.to(text.dtype), (0, 0, 0, length - n_null))
        null_mask = torch.arange(length, device=mask.device) < n_null
        drop = drop.to(device=text.device, dtype=torch.bool)
        return torch.where(drop[:, None, None], null, text), torch.where(drop[:, None], null_mask, mask)

    def embed_captions(self, text: torch.Tensor, mask: torch.Tensor):
        """(caption tokens (B, L', d), pooled (B, d), key mask or None), L' <= L: columns that are padding in every
        row dropped, padding zeroed."""
        keep = mask.any(0)
        if not bool(keep.all()):
            text, mask = text[:, keep], mask[:, keep]
        text = self.text_norm(torch.where(mask[..., None], text, 0))
        pooled = (text * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.text_embedder(text), self.pooled_embedder(pooled), mask

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) latents at time t (B,); text (B, L, text_dim) encoder states, mask (B, L) True for a
        token; drop (B,) True to replace that row's caption by the null caption."""
        if text.dim() != 3 or text.shape[-1] != self.text_dim or mask.shape != text.shape[:2]:
            raise ValueError(f"caption: given states {tuple(text.shape)} and mask {tuple(mask.shape)}; expected "
                             f"(B, L, {self.text_dim}) and (B, L)")
        text, mask = self.drop_captions(text.to(self.null_text.dtype), mask.bool(), drop)
        txt, pooled, mask = self.embed_captions(text, mask)
        img = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(timestep_embedding(t)) + pooled
        key_mask = None
        if not bool(mask.all()):
            key_mask = torch.cat([mask.new_ones(mask.shape[0], img.shape[1]), mask], dim=1)[:, None, None]
        run = compiled_fn(JointBlock.forward, self.compile_mode) if self.compiled else JointBlock.__call__
        final = compiled_fn(final_layer, self.compile_mode) if self.compiled else final_layer
        remat = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            if remat:
                img, txt = checkpoint(run, blk, img, txt, c, self.rope, key_mask, use_reentrant=False)
            else:
                img, txt = run(blk, img, txt, c, self.rope, key_mask)
        return unpatchify(final(self, img, c), self.patch_size, self.grid, self.out_channels)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
                         cfg_scale: float, cfg_channels: int | None = None,
                         cfg_interval_start: float = 0.0) -> torch.Tensor:
        """Guided velocity for B captioned inputs: v_null + s (v_caption - v_null), combined in float32, in rows
        whose t lies in the sampler's guidance interval (sampler.cfg_active); one conditional pass when none does.
        cfg_channels as LightningDiT.forward_with_cfg."""
        b = x.shape[0]
        active = torch.tensor([cfg_active(float(ti), cfg_scale, cfg_interval_start) for ti in t.tolist()])
        no_drop = torch.zeros(b, dtype=torch.bool, device=x.device)
        if not bool(active.any()):
            return self.forward(x, t, text, mask, drop=no_drop)
        both = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, text]), torch.cat([mask, mask]),
                            drop=torch.cat([no_drop, ~no_drop]))
        cond, uncond = both.chunk(2)
        guided = combine_cfg(cond, uncond, cfg_scale, cfg_channels)
        if bool(active.all()):
            return guided
        return torch.where(active.to(x.device)[:, None, None, None], guided, cond.to(guided.dtype))


# (depth, width, heads). B/L/XL: the class registry's shapes, so the text DiT's step compares with the class
# DiT's at equal width and depth. 2B: SD3-medium's MMDiT shape (depth 24, width 64 * depth, head dim 64), ~2.0B
# parameters with a 4096-d encoder (T5-XXL): the paper's ~2B text-to-image model at 256 px.
SIZES = {"B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16), "2B": (24, 1536, 24)}
T2I_DIT_MODELS: dict[str, Callable[..., TextLightningDiT]] = {
    f"T2I-{name}/{p}": partial(TextLightningDiT, depth=d, hidden_size=hs, num_heads=nh, patch_size=p)
    for name, (d, hs, nh) in SIZES.items() for p in (1, 2)
}
T2I_DIT_MODELS["tiny"] = partial(TextLightningDiT, depth=4, hidden_size=128, num_heads=4, patch_size=1)
T2I_DIT_MODELS["tiny/2"] = partial(TextLightningDiT, depth=4, hidden_size=128, num_heads=4, patch_size=2)


def build_t2i_dit(name: str, input_size: int, in_channels: int, text_dim: int, **overrides) -> TextLightningDiT:
    if name not in T2I_DIT_MODELS:
        raise ValueError(f"dit.model: given {name!r}; expected one of {sorted(T2I_DIT_MODELS)}")
    return T2I_DIT_MODELS[name](input_size=input_size, in_channels=in_channels, text_dim=text_dim, **overrides)
