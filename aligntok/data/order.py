"""Training sample orders: per-epoch permutations, pure functions of (seed, epoch), and the step-indexed sampler
that cuts them into per-rank batches.

Because an epoch's order is a permutation and depends on nothing but (seed, epoch), the step-indexed sampler
can cut it into disjoint, complete per-rank parts and a resumed run sees exactly the batches it would have seen.

Locality (`group_sizes` given: the sizes of the row groups the rows are stored in, in file order): the epoch
visits row groups in a random order and shuffles rows only within a window of `window` (8) consecutive row
groups of that order. A global batch of B rows therefore touches at most ~(B / rows per window + 1) windows.
`StepBatches` sorts each global batch by storage row and gives each rank a contiguous slice of it, so a rank's
rows come from the few row groups that slice covers. ImageNet numbers (row groups of 32, global batch 256 on 8
ranks): a global batch is one or two windows (8-16 row groups); each rank's 32 samples are 1-3 of them (8 when
ranks took strided positions of the batch), and no two ranks read the same row group. The trade-off: rows
stored in one row group land within one window (8 x 32 = 256 positions) of each other, so a batch holds samples
from a few row groups instead of from anywhere in the set, and a rank's micro-batch mostly from one or two. Row
groups hold consecutive source items, which `prepare` interleaves across classes (a row group spans 32 classes),
and the row-group order and the windows change every epoch. A full shuffle (window = all row groups) would make
every sample of every batch a read of its own row group. Latents (O(1) random access) use a full permutation.
"""
from __future__ import annotations

import numpy as np
import torch

from aligntok.data.dataset import contiguous_part

WINDOW_GROUPS = 8


def epoch_permutation(n: int, seed: int, epoch: int, group_sizes=None, window: int = WINDOW_GROUPS) -> np.ndarray:
    """The order of epoch `epoch`: a full shuffle, or with `group_sizes` a row-group-local one (module docstring)."""
    rng = np.random.default_rng([seed, epoch])
    if group_sizes is None:
        return rng.permutation(n)
    sizes = np.asarray(group_sizes, dtype=np.int64)
    if int(sizes.sum()) != n or (sizes < 0).any():
        raise ValueError(f"row-group sizes sum to {int(sizes.sum())}; expected the data set's {n} rows")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    groups = rng.permutation(len(sizes))
    lens = sizes[groups]
    first = np.cumsum(lens) - lens  # where each visited row group begins in the epoch
    order = np.repeat(starts[groups], lens) + (np.arange(n) - np.repeat(first, lens))
    window_of = np.repeat(np.arange(len(groups)) // max(1, window), lens)
    return order[np.lexsort((rng.random(n), window_of))]


def variant_choice(n: int, seed: int, epoch: int, variants: int) -> np.ndarray:
    """Which stored variant (e.g. 0 = as cached, 1 = flipped) each position of epoch `epoch` uses.

    A separate stream from the order's, so the order of source images is the same with or without variants.
    """
    if variants <= 1:
        return np.zeros(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch, 1]).integers(variants, size=n)


class StepBatches(torch.utils.data.Sampler):
    """Yields this rank's index lists for steps `start..steps-1`; sample p of the run is order_{p//N}[p%N].

    A batch depends only on (seed, step), never on what ran before, so a resumed run sees the same data. An
    epoch's order is a permutation of the N source images (`epoch_permutation`): row-group-local when
    `group_sizes` (the stored row groups) is given, so a streaming reader touches few row groups per batch. With
    `variants` > 1 (e.g. latents cached with a flipped copy) an epoch still counts N images, and each position
    picks one variant, as item index `variant * N + image`.

    The global batch of a step (`global_batch`) is the same for every world size; rank r takes its r-th
    contiguous slice, so the ranks' batches laid end to end are the one-process batch, and r ranks with
    `grad_accum` a see the micro-batches one process sees with r * a. With `group_sizes` the global batch is
    sorted by storage row, so each slice covers few row groups (module docstring).
    """

    def __init__(self, n: int, batch: int, steps: int, start: int, seed: int, rank: int = 0, world: int = 1,
                 group_sizes=None, variants: int = 1):
        if n == 0:
            raise ValueError("the training split is empty; prepare more images or lower data.val_fraction")
        contiguous_part(batch, rank, world)  # validates rank/world now
        self.n, self.batch, self.steps, self.start, self.seed = n, batch, steps, start, seed
        self.rank, self.world, self.group_sizes, self.variants = rank, world, group_sizes, variants
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:  # one epoch kept: O(N) memory
            order = epoch_permutation(self.n, self.seed, epoch, self.group_sizes)
            if self.variants > 1:
                order = order + self.n * variant_choice(self.n, self.seed, epoch, self.variants)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def positions(self, step: int) -> list[int]:
        """The item indices at run positions step * batch .. (step + 1) * batch - 1, in order."""
        return [int(self._order(p // self.n)[p % self.n]) for p in range(step * self.batch, (step + 1) * self.batch)]

    def global_batch(self, step: int) -> list[int]:
        """Every rank's samples of `step` together, whatever the world size."""
        items = self.positions(step)
        if self.group_sizes is not None:  # by storage row (a variant is the same stored row): few row groups a slice
            items.sort(key=lambda i: i % self.n)
        return items

    def indices(self, step: int) -> list[int]:
        part = contiguous_part(self.batch, self.rank, self.world)
        return self.global_batch(step)[part.start:part.stop]

    def __iter__(self):
        for step in range(self.start, self.steps):
            yield self.indices(step)

    def __len__(self) -> int:
        return self.steps - self.start
