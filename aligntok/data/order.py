"""Per-epoch sample orders for training: pure functions of (seed, epoch), each a permutation of all N indices.

Because an epoch's order is a permutation and depends on nothing but (seed, epoch), the step-indexed sampler
can cut it into disjoint, complete per-rank parts and a resumed run sees exactly the batches it would have seen.

Locality (`group_sizes` given: the sizes of the row groups the rows are stored in, in file order): the epoch
visits row groups in a random order and shuffles rows only within a window of `window` (8) consecutive row
groups of that order. A batch of B rows therefore touches at most ~(B / rows per window + 1) windows, and the
reader reads each row group a batch touches once. ImageNet numbers (row groups of 32, global batch 256 on 8
ranks): a global batch is 8 row groups, each rank's 32 samples touch ~8 of them, and all ranks read the same
ones at the same time, so the disk reads each row group about once per epoch (the page cache serves the rest).
The trade-off: rows stored in one row group land within one window (8 x 32 = 256 positions) of each other, so
a batch holds samples from a few row groups instead of from anywhere in the set, and rows of a row group often
share a batch. Row groups hold consecutive source items, which `prepare` interleaves across classes (a row
group spans 32 classes), and the row-group order and the windows change every epoch. A full shuffle (window =
all row groups) would make every sample of every batch a read of its own row group. Latents (O(1) random
access) use a full permutation.
"""
from __future__ import annotations

import numpy as np

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
