"""A rough estimate of the disk a profile's stage outs take, for `aligntok preflight`.

Counted: the prepared image shards (PNG at compress_level 1 is about 0.6 of the raw RGB bytes on photos), the latent
cache (fp32, twice with latents.hflip), checkpoints (16 bytes a parameter: fp32 weights, EMA and AdamW's two moments,
an upper bound for stages that train part of the model; train.checkpoint.KEEP of them per stage, three tokenizer
stages and the DiT) and evaluate's two 50K-sample sets (raw uint8, with and without CFG, parts and final file).
Parameter counts come from the models built on the meta device, so nothing is allocated. DVC's cache adds a second
copy unless cache.type links (this repository's .dvc/config sets hardlink,symlink).
"""
from __future__ import annotations

import configparser
import os
from pathlib import Path

from aligntok.config import Params

PNG_RATIO = 0.6
BYTES_PER_PARAM = 16  # fp32 weights + EMA + AdamW exp_avg + exp_avg_sq
SAMPLED_CLASS_FOLDERS = 20  # image folders: files counted in this many class folders, times the folder count


def train_images(params: Params, base: Path) -> tuple[int, str]:
    d = params.data
    if d.num_images is not None or d.source == "synthetic":
        return int(d.num_images or 0), "data.num_images"
    root = (base / d.root).expanduser() if d.root else None
    if root is None or not root.exists():
        raise ValueError(f"data.root {d.root!r} not found: nothing to count")
    if d.source == "parquet":
        import pyarrow.parquet as pq
        files = [root] if root.is_file() else sorted(root.glob("*.parquet"))
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files), f"rows of {len(files)} parquet files"
    classes = sorted(e.path for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    sample = classes[:SAMPLED_CLASS_FOLDERS]
    files = sum(sum(1 for e in os.scandir(c) if e.is_file()) for c in sample)
    return round(files / max(len(sample), 1) * len(classes)), f"files in {len(sample)} of {len(classes)} class folders"


def latent_geometry(params: Params) -> tuple[int, int]:
    """(latent channels, stride): the params', or for tokenizer.kind external the pretrained VAE's own."""
    t = params.tokenizer
    if t.kind == "external":
        from aligntok.models.external import vae_geometry
        return vae_geometry(t.external, t.external_subfolder)
    return t.latent_channels, t.latent_stride


def parameter_counts(params: Params) -> tuple[int, int]:
    """(tokenizer, DiT) parameter counts, built on the meta device; the tokenizer's is 0 for tokenizer.kind external,
    which no stage trains (no tokenizer checkpoints)."""
    import torch

    from aligntok.models.dit import build_dit
    from aligntok.models.tokenizer import AlignTokenizer
    from aligntok.stages.tokenizer import tokenizer_config
    channels, stride = latent_geometry(params)
    with torch.device("meta"):
        tok = None if params.tokenizer.kind == "external" else AlignTokenizer(tokenizer_config(params),
                                                                              _load_encoder_weights=False)
        dit = build_dit(params.dit.model, input_size=params.data.resolution // stride, in_channels=channels,
                        num_classes=params.data.num_classes)
    return sum(p.numel() for p in tok.parameters()) if tok else 0, sum(p.numel() for p in dit.parameters())


def _dvc_links(project: Path) -> bool:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string((project / ".dvc" / "config").read_text())
    except (OSError, configparser.Error):
        return False
    kinds = parser.get("cache", "type", fallback="copy")
    return any(k.strip() in ("hardlink", "symlink", "reflink") for k in kinds.split(","))


def disk_estimate(params: Params, base: Path, project: Path) -> tuple[int, str]:
    """(bytes, how it was computed in one line)."""
    from aligntok.train.checkpoint import KEEP
    d = params.data
    n, counted = train_images(params, base)
    raw = d.resolution ** 2 * 3
    images = n * raw * PNG_RATIO
    channels, stride = latent_geometry(params)
    latents = n * (2 if params.latents.hflip else 1) * channels * (d.resolution // stride) ** 2 * 4
    tok, dit = parameter_counts(params)
    ckpts = KEEP * BYTES_PER_PARAM * (3 * tok + dit)
    samples = 2 * 2 * params.eval.num_samples * raw
    total = images + latents + ckpts + samples
    links = _dvc_links(project)
    how = (f"{n} train images ({counted}): shards {images / 1e9:.1f} GB + latents {latents / 1e9:.1f} GB + "
           f"checkpoints {ckpts / 1e9:.1f} GB ({tok / 1e6:.0f}M tokenizer, {dit / 1e6:.0f}M DiT parameters) + "
           f"samples {samples / 1e9:.1f} GB; DVC cache {'links' if links else 'copies: x2'}")
    return int(total if links else 2 * total), how
