"""Latent cache: safetensors shards + manifest.json + latent_stats (per-channel mean/std), memory-mapped.

Format: the safetensors shards cache-latents writes (tensors `latents`, optional `latents_flip`, `labels`,
`indices`) are read in place with `np.memmap` at the offsets their JSON header gives. safetensors is a raw,
fixed-offset little-endian layout made for exactly this: no conversion pass or second copy on disk, finished
shards stay resumable and hard-linkable, nothing is unpickled, and every rank and DataLoader worker shares one
copy through the page cache. An item is one row slice (O(1)); no shard is ever loaded or concatenated whole.

The manifest records the tokenizer's hash; a cache made by another tokenizer is refused. Stats are exact
(float64 sums over every cached latent, in shard order and fixed row chunks), so they are deterministic. They
travel with the cache and the DiT export, and `normalize`/`denormalize` are the only places they are applied.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
           "U8": "u1", "BOOL": "?"}
_MAX_HEADER = 100 << 20
STATS_CHUNK = 1024  # rows per float64 partial sum: bounds memory, fixes the summation order


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


def memmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only memory map (header validated; nothing else read)."""
    path = Path(path)

    def bad(what: str) -> LatentCacheError:
        return LatentCacheError(f"{path}: {what}; expected a safetensors latent shard "
                                f"(re-run `aligntok cache-latents`)")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise bad(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise bad("file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"unreadable header ({type(e).__name__})") from None
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = np.dtype(_DTYPES[info["dtype"]]), tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has an unsupported dtype or malformed entry") from None
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dtype.itemsize or not 0 <= begin <= end <= size - 8 - n:
            raise bad(f"tensor {name!r} offsets {begin}..{end} do not match its shape {list(shape)}")
        out[name] = (np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=shape) if count
                     else np.empty(shape, dtype))
    return out


def stats_tensors(stats: dict) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(stats["mean"], dtype=torch.float32)[:, None, None]
    std = torch.tensor(stats["std"], dtype=torch.float32)[:, None, None]
    return mean, std


def normalize(z: torch.Tensor, stats: dict | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(z - mean) / std per channel; `stats` the latent_stats dict, or its `stats_tensors` already on z's device
    (what the training step passes: no host-to-device copy per step)."""
    mean, std = stats if isinstance(stats, tuple) else stats_tensors(stats)
    return (z - mean.to(z)) / std.to(z)


def denormalize(z: torch.Tensor, stats: dict) -> torch.Tensor:
    mean, std = stats_tensors(stats)
    return z * std.to(z) + mean.to(z)


def compute_stats(shards: list[Path]) -> dict:
    """Per-channel mean/std over every latent (and flipped latent) of `shards`, from float64 sums."""
    total, sq, count = None, None, 0
    for path in shards:
        maps = memmap_safetensors(path)
        for key in ("latents", "latents_flip"):
            z_all = maps.get(key)
            if z_all is None:
                continue
            for a in range(0, z_all.shape[0], STATS_CHUNK):
                z = np.asarray(z_all[a:a + STATS_CHUNK], dtype=np.float64)
                s, q = z.sum(axis=(0, 2, 3)), (z * z).sum(axis=(0, 2, 3))
                total = s if total is None else total + s
                sq = q if sq is None else sq + q
                count += z.shape[0] * z.shape[2] * z.shape[3]
    if count == 0:
        raise LatentCacheError("latent cache is empty: no latents to compute latent_stats from")
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean * mean, 1e-12))
    return {"mean": mean.tolist(), "std": std.tolist(), "count": count}


class LatentDataset(torch.utils.data.Dataset):
    """(latent, label) pairs read from memory-mapped shards; with a flipped copy cached, 2N items.

    Item `v * N + i` is variant v (0 as cached, 1 flipped) of source image i. An epoch counts source images:
    the training sampler reads `num_source_images` and `num_variants` and draws one variant per position.
    `latents` and `labels` materialise every item in memory (small sets only: tests, analysis).
    """

    def __init__(self, cache_dir: Path, tokenizer_hash: str | None = None):
        self.dir = Path(cache_dir)
        self.manifest = read_cache_manifest(self.dir, tokenizer_hash)
        self.stats = self.manifest["latent_stats"]
        self.num_classes = self.manifest["num_classes"]
        self._paths = [self.dir / s["file"] for s in self.manifest["shards"]]
        rows = [int(s["rows"]) for s in self.manifest["shards"]]
        self._start = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
        self.num_source_images = int(self._start[-1])
        self._maps: list[dict] | None = None
        maps = self._shards()  # validated now, with one-line errors, not in a DataLoader worker
        shape = self.manifest.get("latent_shape")
        has_flip = [("latents_flip" in m) for m in maps]
        for path, m, n in zip(self._paths, maps, rows):
            for key in ("latents", "labels") + (("latents_flip",) if any(has_flip) else ()):
                if key not in m:
                    raise LatentCacheError(f"{path}: no '{key}' tensor; re-run `aligntok cache-latents`")
                wrong_shape = key != "labels" and shape is not None and list(m[key].shape[1:]) != list(shape)
                if m[key].shape[0] != n or wrong_shape:
                    raise LatentCacheError(f"{path}: '{key}' has shape {list(m[key].shape)}; expected {n} rows of "
                                           f"{shape} (manifest); re-run `aligntok cache-latents`")
        self.num_variants = 2 if maps and all(has_flip) else 1

    def _shards(self) -> list[dict]:
        """This process's memory maps (opened lazily; a forked or unpickled copy opens its own)."""
        if self._maps is None or self._pid != os.getpid():
            self._maps, self._pid = [memmap_safetensors(p) for p in self._paths], os.getpid()
        return self._maps

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}  # pickling a memmap would copy its data

    def __len__(self) -> int:
        return self.num_variants * self.num_source_images

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"latent {i} out of range [0, {len(self)})")
        variant, src = divmod(int(i), self.num_source_images)
        f = int(np.searchsorted(self._start, src, side="right")) - 1
        shard, off = self._shards()[f], src - int(self._start[f])
        z = np.array(shard["latents_flip" if variant else "latents"][off], dtype=np.float32)  # a copy of one row
        return torch.from_numpy(z), int(shard["labels"][off])

    @property
    def latents(self) -> torch.Tensor:
        keys = ("latents", "latents_flip")[:self.num_variants]
        return torch.cat([torch.from_numpy(np.array(m[k], dtype=np.float32)) for k in keys for m in self._shards()])

    @property
    def labels(self) -> torch.Tensor:
        y = torch.cat([torch.from_numpy(np.array(m["labels"], dtype=np.int64)) for m in self._shards()])
        return y.repeat(self.num_variants)
