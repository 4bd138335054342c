"""The linear probe of a tokenizer's latents: readable classes score high, label-free latents score at chance, the
val split is scored batch by batch, and the train sample is class-stratified (or n/a with the reason)."""
import torch

from collections import Counter

from aligntok.eval.probe import linear_probe, stratified


class Identity(torch.nn.Module):
    """A stand-in tokenizer whose latent is the image itself (the probe only calls encode)."""

    def encode(self, x):
        return x


def split(n, num_classes, signal, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    x = torch.randn(n, 3, 4, 4, generator=g)
    x.view(n, -1)[torch.arange(n), labels] += signal  # the class as a bump in one latent entry
    return list(zip(x, labels.tolist()))


def test_probe_reads_classes_from_latents_that_carry_them():
    out = linear_probe(Identity(), split(300, 10, 6.0, 0), split(150, 10, 6.0, 1), 10, torch.device("cpu"),
                       per_class=20)
    # the bump is 6 sd of the noise: well separated, but 150 val images span 3 batches of 64
    assert out["linear_probe_acc"] >= 0.95
    assert (out["probe_train_images"], out["probe_val_images"]) == (200, 150)


def test_probe_is_at_chance_on_latents_without_the_class():
    out = linear_probe(Identity(), split(300, 10, 0.0, 0), split(400, 10, 0.0, 1), 10, torch.device("cpu"))
    # chance is 0.1; 400 val draws have sd 0.015, so 0.2 is more than 6 sd above it
    assert out["linear_probe_acc"] < 0.2


def test_the_train_sample_is_stratified_where_the_first_images_would_not_be():
    # `prepare` interleaves classes: with 1,000 classes the first 1,000 images are one per class
    labels = [i % 1000 for i in range(15_000)]
    picked = stratified(labels, 1000, per_class=10, seed=0)
    assert Counter(labels[i] for i in picked) == {c: 10 for c in range(1000)}
    assert len(set(picked)) == 10_000 and picked == sorted(picked)
    assert picked != stratified(labels, 1000, per_class=10, seed=1)  # a seeded draw, not the first 10 of each
    assert picked == stratified(labels, 1000, per_class=10, seed=0)


def test_probe_is_na_with_the_reason_when_a_class_is_short():
    train = split(300, 10, 6.0, 0)
    train = [item for i, item in enumerate(train) if item[1] != 7 or i < 100]  # class 7 keeps 10 of 30 images
    out = linear_probe(Identity(), train, split(50, 10, 6.0, 1), 10, torch.device("cpu"), per_class=11)
    assert out == {"probe_na": "1 of 10 classes have fewer than eval.probe_per_class=11 train images (class 7: 10)"}
    out = linear_probe(Identity(), train, split(50, 10, 6.0, 1), 10, torch.device("cpu"), per_class=10)
    assert out["probe_train_images"] == 100
