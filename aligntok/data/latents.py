"""Latent cache: safetensors shards + manifest.json + latent_stats (per-channel mean/std).

The manifest records the tokenizer's hash; a cache made by another tokenizer is refused. Stats are exact
(float64 sums over every cached latent in shard order), so they are deterministic. They travel with the cache
and the DiT export, and `normalize`/`denormalize` are the only places they are applied.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

MANIFEST = "manifest.json"


class LatentCacheError(ValueError):
    pass


def read_cache_manifest(cache_dir: Path, tokenizer_hash: str | None = None) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        raise LatentCacheError(f"{path}: latent cache manifest not found; run `aligntok cache-latents` first")
    manifest = json.loads(path.read_text())
    if tokenizer_hash is not None and manifest["tokenizer_hash"] != tokenizer_hash:
        raise LatentCacheError(
            f"{path}: latent cache was made by tokenizer {manifest['tokenizer_hash']}, but the current tokenizer is "
            f"{tokenizer_hash}; re-run `aligntok cache-latents` (or `dvc repro cache-latents`)")
    return manifest


def stats_tensors(stats: dict) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(stats["mean"], dtype=torch.float32)[:, None, None]
    std = torch.tensor(stats["std"], dtype=torch.float32)[:, None, None]
    return mean, std


def normalize(z: torch.Tensor, stats: dict) -> torch.Tensor:
    mean, std = stats_tensors(stats)
    return (z - mean.to(z)) / std.to(z)


def denormalize(z: torch.Tensor, stats: dict) -> torch.Tensor:
    mean, std = stats_tensors(stats)
    return z * std.to(z) + mean.to(z)


def compute_stats(shards: list[Path]) -> dict:
    total, sq, count = None, None, 0
    for path in shards:
        for key in ("latents", "latents_flip"):
            with safe_open(str(path), framework="pt") as f:
                if key not in f.keys():
                    continue
                z = f.get_tensor(key).double()
            s = z.sum(dim=(0, 2, 3))
            q = (z * z).sum(dim=(0, 2, 3))
            total = s if total is None else total + s
            sq = q if sq is None else sq + q
            count += z.shape[0] * z.shape[2] * z.shape[3]
    if count == 0:
        raise LatentCacheError("latent cache is empty: no latents to compute latent_stats from")
    mean = total / count
    std = (sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return {"mean": mean.tolist(), "std": std.tolist(), "count": count}


class LatentDataset(torch.utils.data.Dataset):
    """(latent, label) pairs; with a flipped copy cached, both variants are items (2N in all)."""

    def __init__(self, cache_dir: Path, tokenizer_hash: str | None = None):
        self.dir = Path(cache_dir)
        self.manifest = read_cache_manifest(self.dir, tokenizer_hash)
        self.stats = self.manifest["latent_stats"]
        self.num_classes = self.manifest["num_classes"]
        z, y, zf = [], [], []
        for shard in self.manifest["shards"]:
            t = load_file(str(self.dir / shard["file"]))
            z.append(t["latents"])
            y.append(t["labels"])
            if "latents_flip" in t:
                zf.append(t["latents_flip"])
        self.latents = torch.cat(z + zf)
        self.labels = torch.cat(y + (y if zf else []))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.latents[i].float(), int(self.labels[i])
