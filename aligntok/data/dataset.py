"""Datasets over prepared shards: map-style for training, iterable (rank- and worker-split) for caching/eval.

Both stream from disk through `RowGroupReader`: a process holds at most a few row groups of encoded images
(4 for `ShardDataset`, 1 for `ShardIterable`), never a whole split, so memory does not grow with the data set.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aligntok.cpus import usable_cpus
from aligntok.data.reader import RowGroupReader
from aligntok.data.shards import SPLITS, DataError, read_manifest


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


def loader_workers(num_workers: int | None, ranks_per_node: int = 1) -> int:
    """DataLoader workers per rank for `data.num_workers`: null = the CPUs this process may use, shared among the
    node's ranks."""
    return max(1, usable_cpus() // max(1, ranks_per_node)) if num_workers is None else num_workers


def contiguous_part(n: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous slice of [0, n): disjoint, complete, and each rank reads only its own row groups."""
    partition(n, rank, world_size)  # same validation
    return range(n * rank // world_size, n * (rank + 1) // world_size)


class _Images(Sequence):
    """The encoded image bytes of a split, read on access through the reader's cache (never all in memory)."""

    def __init__(self, reader: RowGroupReader):
        self.reader = reader

    def __len__(self) -> int:
        return self.reader.num_rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        return self.reader.row(i)["image"]


class ShardDataset(torch.utils.data.Dataset):
    """A split of a prepared data set, streamed from its shards; images decode on access.

    Memory per process: at most `cache_row_groups` row groups (~4 MB each at 256 px) plus the row-group index.
    `row_group_sizes` lets the training sampler keep batches row-group-local (`aligntok.data.order`).
    `labels` and `keys` read one small column of every row on first use (O(N) ints/strings, no image bytes).
    """

    def __init__(self, data_dir: Path, split: str = "train", hflip: bool = False, cache_row_groups: int = 4):
        if split not in SPLITS:
            raise DataError(f"split: given {split!r}; expected 'train' or 'val'")
        self.dir, self.split, self.hflip = Path(data_dir), split, hflip
        manifest = read_manifest(self.dir)
        self.class_names: list[str] = list(manifest["class_names"])
        self.num_classes: int = int(manifest["num_classes"])
        self.resolution: int = int(manifest["resolution"])
        self.content_hash: str = manifest["content_hash"]
        self.reader = RowGroupReader([(self.dir / s["file"], s["rows"]) for s in manifest["shards"][split]],
                                     cache=cache_row_groups)
        self.row_group_sizes = self.reader.row_group_sizes
        self.images = _Images(self.reader)
        self._labels: list[int] | None = None
        self._keys: list[str] | None = None

    @property
    def labels(self) -> list[int]:
        if self._labels is None:
            self._labels = self.reader.column("label")
        return self._labels

    @property
    def keys(self) -> list[str]:
        if self._keys is None:
            self._keys = self.reader.column("key")
        return self._keys

    @property
    def counters(self) -> dict[str, int]:
        """The reader's opens/reads/hits and peaks (this process only)."""
        return self.reader.counters

    def __len__(self) -> int:
        return self.reader.num_rows

    def _item(self, row: dict) -> tuple[torch.Tensor, int]:
        flip = self.hflip and torch.rand(()).item() < 0.5
        return decode_image(row["image"], flip), row["label"]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self._item(self.reader.row(int(i)))

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A batch (the DataLoader calls this): each row group it touches is read once, whatever the order."""
        return [self._item(row) for row in self.reader.rows(indices)]


class ShardIterable(torch.utils.data.IterableDataset):
    """Iterates a split in order, split across DDP ranks and DataLoader workers; yields (index, image, label).

    Parts are whole row groups (strided over ranks x workers): disjoint, complete, one row group in memory.
    """

    def __init__(self, data_dir: Path, split: str, rank: int = 0, world_size: int = 1, hflip: bool = False):
        self.base = ShardDataset(data_dir, split, hflip, cache_row_groups=1)
        self.rank, self.world_size = rank, world_size
        partition(0, rank, world_size)  # validates rank/world_size now rather than in a worker

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = self.base.reader
        for g in partition(reader.num_row_groups, self.rank, self.world_size, wid, nw):
            table, start = reader.group(g), reader.group_start(g)
            for off in range(table.num_rows):
                row = {c: table.column(c)[off].as_py() for c in ("image", "label")}
                yield (start + off, *self.base._item(row))
