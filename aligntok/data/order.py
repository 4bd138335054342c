"""Per-epoch sample orders for training: pure functions of (seed, epoch), each a permutation of all N indices.

Because an epoch's order is a permutation and depends on nothing but (seed, epoch), the step-indexed sampler
can cut it into disjoint, complete per-rank parts and a resumed run sees exactly the batches it would have seen.

Locality (`group_sizes` given: the sizes of the row groups the rows are stored in, in file order): the epoch
visits row groups in a random order and shuffles rows only within a window of `window` consecutive row groups
of that order. A batch therefore touches at most ~(batch / rows per window + 1) windows, i.e. a bounded number
of row groups, and each is read once per batch instead of once per sample. The trade-off: two rows stored in the
same row group land within one window (16 x 32 = 512 positions) of each other in the epoch, so a batch mixes
samples from a few dozen row groups rather than from the whole set. Row groups hold consecutive source items,
which `prepare` interleaves across classes, so a window still spans many classes; across epochs the row-group
order and the windows' contents change. Latents (O(1) random access) use a full permutation instead.
"""
from __future__ import annotations

import numpy as np

WINDOW_GROUPS = 16


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
