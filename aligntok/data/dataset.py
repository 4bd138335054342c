"""Datasets over prepared shards: map-style for training, iterable (rank- and worker-split) for caching/eval."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aligntok.data.shards import SPLITS, DataError, read_manifest, read_shard


def decode_image(data: bytes, hflip: bool = False) -> torch.Tensor:
    """PNG/JPEG bytes -> float32 3xHxW in [-1, 1] (mirrored left-right if `hflip`)."""
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("RGB"))
    if hflip:
        arr = arr[:, ::-1]
    # numpy, not torch ops: per-sample work stays off torch's intra-op thread pool
    out = np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)
    out /= 127.5
    out -= 1.0
    return torch.from_numpy(out)


def partition(n: int, rank: int, world_size: int, worker_id: int = 0, num_workers: int = 1) -> range:
    """Indices of [0, n) for one (rank, worker): strided, so all parts are disjoint and together complete."""
    if not (0 <= rank < world_size and 0 <= worker_id < num_workers) or n < 0:
        raise ValueError(f"bad partition n={n} rank={rank}/{world_size} worker={worker_id}/{num_workers}")
    return range(rank * num_workers + worker_id, n, world_size * num_workers)


class ShardDataset(torch.utils.data.Dataset):
    """A split of a prepared data set, held as encoded PNG bytes in memory; images decode on access.

    Encoded bytes are ~1/3 of raw pixels; ImageNet at 256 px would need ~60 GB, so sets that large want a
    per-shard reader instead (not written yet).
    """

    def __init__(self, data_dir: Path, split: str = "train", hflip: bool = False):
        if split not in SPLITS:
            raise DataError(f"split: given {split!r}; expected 'train' or 'val'")
        self.dir, self.split, self.hflip = Path(data_dir), split, hflip
        manifest = read_manifest(self.dir)
        self.class_names: list[str] = list(manifest["class_names"])
        self.num_classes: int = int(manifest["num_classes"])
        self.resolution: int = int(manifest["resolution"])
        self.content_hash: str = manifest["content_hash"]
        self.images: list[bytes] = []
        self.labels: list[int] = []
        self.keys: list[str] = []
        for shard in manifest["shards"][split]:
            path = self.dir / shard["file"]
            t = read_shard(path)
            if t.num_rows != shard["rows"]:
                raise DataError(f"{path}: {t.num_rows} rows, manifest says {shard['rows']}; re-run `aligntok prepare`")
            self.images += t.column("image").to_pylist()
            self.labels += t.column("label").to_pylist()
            self.keys += t.column("key").to_pylist()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        flip = self.hflip and torch.rand(()).item() < 0.5
        return decode_image(self.images[i], flip), self.labels[i]


class ShardIterable(torch.utils.data.IterableDataset):
    """Iterates a split in order, split across DDP ranks and DataLoader workers; yields (index, image, label)."""

    def __init__(self, data_dir: Path, split: str, rank: int = 0, world_size: int = 1, hflip: bool = False):
        self.base = ShardDataset(data_dir, split, hflip)
        self.rank, self.world_size = rank, world_size
        partition(0, rank, world_size)  # validates rank/world_size now rather than in a worker

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in partition(len(self.base), self.rank, self.world_size, wid, nw):
            x, y = self.base[i]
            yield i, x, y
