"""Known values for what turns a sample index into an image on disk: its label (balanced, or the documented
splitmix64 hash), the uint8 conversion of the decoded image and the labelled grid. A changed hash constant would
silently change which class every random-label sample shows (and orphan cached samples); a shifted uint8 map
would bias every FID feature."""
import numpy as np
import pytest
import torch

from aligntok.generate import labelled_grid, sample_labels, sample_noise, to_uint8_nhwc

MASK = 2**64 - 1


def splitmix_label(i: int, seed: int, classes: int) -> int:
    """The generator's documented hash, written independently with Python integers (mod 2^64)."""
    x = (i + seed * 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return (x ^ (x >> 31)) % classes


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_random_labels_are_the_splitmix_hash_of_seed_and_index(seed):
    idx = [0, 1, 2, 999, 10**9]
    got = sample_labels(idx, 1000, "random", seed).tolist()
    assert got == [splitmix_label(i, seed, 1000) for i in idx]


def test_random_labels_cover_the_classes_evenly_and_balanced_is_index_mod_classes():
    labels = sample_labels(range(20_000), 10, "random", 3)
    counts = np.bincount(labels.numpy(), minlength=10)
    # 2,000 expected per class, binomial sd ~42: +-250 (~6 sd) never fails a fair hash, and catches one that folds
    # onto fewer classes (e.g. a modulus off by one)
    assert counts.min() > 1750 and counts.max() < 2250
    assert sample_labels([0, 1, 9, 10, 23], 10, "balanced", 3).tolist() == [0, 1, 9, 0, 3]
    with pytest.raises(ValueError, match="eval.labels"):
        sample_labels([0], 10, "uniform", 0)


def test_noise_of_an_index_does_not_depend_on_its_batch():
    a = sample_noise([4, 5, 6], (2, 3, 3), seed=1)
    b = sample_noise([6], (2, 3, 3), seed=1)
    assert torch.equal(a[2], b[0])  # one generator per index: bit-identical, no tolerance needed
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(sample_noise([6], (2, 3, 3), seed=2)[0], b[0])


def test_uint8_conversion_known_values():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 1.2, -3.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    out = to_uint8_nhwc(x)
    assert out.shape == (1, 1, 7, 3) and out.dtype == np.uint8
    # (x + 1) * 127.5, rounded half to even, clipped: 0, 63.75 -> 64, 127.5 -> 128, 191.25 -> 191, 255, 280.5 -> 255
    assert out[0, 0, :, 0].tolist() == [0, 64, 128, 191, 255, 255, 0]
    assert (out[..., 0] == out[..., 2]).all()


def test_labelled_grid_places_each_image_under_its_name():
    images = np.stack([np.full((8, 6, 3), 40 * (i + 1), np.uint8) for i in range(5)])
    grid = np.asarray(labelled_grid(images, [2, 0, 1, 2, 0], ["cat", "dog", "eel"], cols=3))
    pad = 12
    assert grid.shape == (2 * (8 + pad), 3 * 6, 3)
    for i in range(5):
        r, c = divmod(i, 3)
        cell = grid[r * (8 + pad) + pad:(r + 1) * (8 + pad), c * 6:(c + 1) * 6]
        assert (cell == 40 * (i + 1)).all(), i
    assert (grid[8 + pad + pad:, 2 * 6:] == 255).all()  # the sixth cell stays white
    strip = grid[:pad, :6]
    assert (strip != 255).any()  # the class name is written above the image


def test_prompt_grid_wraps_each_prompt_over_an_enlarged_tile():
    images = np.stack([np.full((8, 8, 3), 40 * (i + 1), np.uint8) for i in range(3)])
    prompts = ["two red stars at the left on a black background", "one blue circle at the top", "x"]
    grid = np.asarray(labelled_grid(images, [0, 1, 2], prompts, cols=3, wrap=True))
    tile = 8 * 20  # 8 px images enlarged 20x: a 160 px tile, 26 characters a line
    pad = 2 + 11 * 2  # the longest prompt takes two lines
    assert grid.shape == (tile + pad, 3 * tile, 3)
    for i in range(3):
        assert (grid[pad:, i * tile:(i + 1) * tile] == 40 * (i + 1)).all(), i
    assert (grid[12:pad, :tile] != 255).any() and (grid[12:pad, 2 * tile:] == 255).all()  # line 2 only where wrapped
