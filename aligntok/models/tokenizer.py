"""AlignTokenizer: foundation encoder E_p -> adapter A -> latent z0 -> decoder D (and the from-scratch VAE)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from aligntok.models.adapter import Adapter
from aligntok.models.decoder import Decoder
from aligntok.models.encoder import LATENT_STRIDE, LATENT_STRIDES, build_encoder
from aligntok.models.vae import ConvEncoder

# --- the paper's tokenizer (ImageNet 256^2 -> 16x16x32); see also TOKENIZER_SIZES['paper'] ---
PAPER_ENCODER_ARCH = "vit_large_patch14_dinov2"  # DINOv2-L/14 (1024-d), the paper's default foundation encoder
PAPER_IMAGE_SIZE = 256  # input resized to 224 inside the encoder so patch-14 tokens form the 16x16 grid
PAPER_LATENT_CHANNELS = 32  # 256 tokens x 32 channels, same latent shape as VA-VAE f16d32
PAPER_KL = False  # the paper's adapter is deterministic: KL/sampling gave no benefit
PAPER_ADAPTER_HIDDEN = 512  # "lightweight" 1024 -> 32 adapter; the paper gives no width, 512 is our choice
PAPER_DECODER = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                     mid_attn=True)  # VA-VAE f16d32 LDM decoder (the paper builds on its recipe)

TOKENIZER_SIZES: dict[str, dict] = {
    # CPU smoke: 16x up/down in 5 cheap levels, no attention (works at 32-64 px); 16 channels at full resolution,
    # where a CPU step spends most of its time (2.3x faster than 32 there, measured at 64 px, batch 16)
    "tiny": dict(ch=16, ch_mult=(1, 2, 4, 4, 4), num_res_blocks=1, attn_resolutions=(), mid_attn=False),
    # single-GPU experiments: VA-VAE shape at half width, one res block
    "small": dict(ch=64, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(16,), mid_attn=True),
    "paper": PAPER_DECODER,
}

DEFAULT_CONFIG = {"kind": "aligntok", "encoder_arch": PAPER_ENCODER_ARCH, "encoder_pretrained": "hub",
                  "image_size": PAPER_IMAGE_SIZE, "latent_channels": PAPER_LATENT_CHANNELS, "size": "paper",
                  "kl": PAPER_KL, "adapter_hidden": PAPER_ADAPTER_HIDDEN, "latent_stride": LATENT_STRIDE}
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class TokenizerLoadError(RuntimeError):
    """A saved tokenizer directory is missing files or does not match its config."""


def _normalise(config: dict) -> dict:
    unknown = set(config) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown tokenizer config keys {sorted(unknown)}; known: {sorted(DEFAULT_CONFIG)}")
    cfg = {**DEFAULT_CONFIG, **config}
    if cfg["kind"] not in ("aligntok", "vae"):
        raise ValueError(f"tokenizer kind must be 'aligntok' or 'vae', got {cfg['kind']!r} (kind 'external' is "
                         "aligntok.models.external.ExternalTokenizer)")
    if cfg["size"] not in TOKENIZER_SIZES:
        raise ValueError(f"unknown tokenizer size {cfg['size']!r}; known: {sorted(TOKENIZER_SIZES)}")
    cfg["image_size"], cfg["latent_channels"] = int(cfg["image_size"]), int(cfg["latent_channels"])
    cfg["adapter_hidden"], cfg["kl"] = int(cfg["adapter_hidden"]), bool(cfg["kl"])
    cfg["encoder_pretrained"] = str(cfg["encoder_pretrained"])
    cfg["latent_stride"] = int(cfg["latent_stride"])
    if cfg["latent_stride"] not in LATENT_STRIDES:
        raise ValueError(f"latent_stride must be one of {LATENT_STRIDES}, got {cfg['latent_stride']}")
    return cfg


def _levels(size: dict, stride: int) -> dict:
    """A size's up/down path for `stride`: stride 8 drops the coarsest of the five stride-16 levels."""
    n = stride.bit_length()  # 16 -> 5 levels, 8 -> 4
    return {**size, "ch_mult": tuple(size["ch_mult"][:n])}


class AlignTokenizer(nn.Module):
    """kind 'aligntok': pretrained foundation encoder + adapter + LDM decoder.
    kind 'vae': the from-scratch baseline, an LDM conv encoder + 1x1 posterior head + the same decoder."""

    def __init__(self, config: dict, _load_encoder_weights: bool = True):
        super().__init__()
        self.config = cfg = _normalise(config)
        stride = cfg["latent_stride"]
        size = _levels(TOKENIZER_SIZES[cfg["size"]], stride)
        latent = cfg["latent_channels"]
        if cfg["kind"] == "aligntok":
            self.encoder = build_encoder(cfg["encoder_arch"], cfg["encoder_pretrained"], cfg["image_size"],
                                         load_weights=_load_encoder_weights, stride=stride)
            self.adapter = Adapter(self.encoder.out_channels, latent, cfg["adapter_hidden"], cfg["kl"])
        else:
            # encoder_arch / encoder_pretrained / adapter_hidden do not apply to the from-scratch baseline
            self.encoder = ConvEncoder(cfg["image_size"], 2 * latent, ch=size["ch"], ch_mult=size["ch_mult"],
                                       num_res_blocks=size["num_res_blocks"],
                                       attn_resolutions=size["attn_resolutions"], mid_attn=size["mid_attn"])
            self.adapter = Adapter(2 * latent, latent, hidden=0, kl=cfg["kl"])
        self.decoder = Decoder(latent, 3, ch=size["ch"], ch_mult=size["ch_mult"],
                               num_res_blocks=size["num_res_blocks"], attn_resolutions=size["attn_resolutions"],
                               upsample_factor=stride, mid_attn=size["mid_attn"])

    @property
    def latent_channels(self) -> int:
        return self.config["latent_channels"]

    @property
    def grid_size(self) -> int:
        return self.encoder.grid_size

    def encode_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.adapter(self.encoder(x))

    def encode(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        mean, logvar = self.encode_posterior(x)
        if sample and logvar is not None:
            return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor):
        mean, logvar = self.encode_posterior(x)
        z = mean
        if logvar is not None and self.training:  # a Gaussian posterior is sampled while training (LDM)
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return self.decode(z), mean, logvar

    def save_pretrained(self, directory: Path | str) -> None:
        """Write config.json + model.safetensors into a temporary sibling directory, then swap it in."""
        from safetensors.torch import save_file

        from aligntok.io import write_dir_atomic

        def fill(tmp: Path) -> None:
            state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        write_dir_atomic(directory, fill)

    @classmethod
    def from_pretrained(cls, directory: Path | str, map_location="cpu") -> "AlignTokenizer":
        """Rebuild from config.json (encoder at random init: no hub/file access) and load model.safetensors.
        A folder of kind 'external' loads as an ExternalTokenizer (same interface), so every caller takes both."""
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not cfg_path.is_file():
            raise TokenizerLoadError(f"{cfg_path} not found: not a saved tokenizer directory (save_pretrained writes "
                                     f"{CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise TokenizerLoadError(f"{cfg_path} is not valid JSON: {e}") from e
        if isinstance(config, dict) and config.get("kind") == "external":  # a pretrained diffusers VAE's folder
            from aligntok.models.external import ExternalTokenizer
            return ExternalTokenizer.from_pretrained(directory, map_location)
        if not w_path.is_file():
            raise TokenizerLoadError(f"{w_path} not found: not a saved tokenizer directory (save_pretrained writes "
                                     f"{CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            model = cls(config, _load_encoder_weights=False)
        except ValueError as e:
            raise TokenizerLoadError(f"{cfg_path}: {e}") from e
        state = load_file(str(w_path), device="cpu")
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        bad = [k for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or bad:
            raise TokenizerLoadError(f"{w_path} does not match {cfg_path}: missing {missing[:3]} "
                                     f"({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)}), "
                                     f"shape mismatch {bad[:3]}")
        model.load_state_dict(state, strict=True)
        return model.to(map_location)


Tokenizer = AlignTokenizer
