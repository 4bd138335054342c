"""The linear probe of a tokenizer's latents: readable classes score high, label-free latents score at chance, and
the val split is scored batch by batch."""
import torch

from aligntok.eval.probe import linear_probe


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
                       train_images=200)
    # the bump is 6 sd of the noise: well separated, but 150 val images span 3 batches of 64
    assert out["linear_probe_acc"] >= 0.95
    assert (out["probe_train_images"], out["probe_val_images"]) == (200, 150)


def test_probe_is_at_chance_on_latents_without_the_class():
    out = linear_probe(Identity(), split(300, 10, 0.0, 0), split(400, 10, 0.0, 1), 10, torch.device("cpu"))
    # chance is 0.1; 400 val draws have sd 0.015, so 0.2 is more than 6 sd above it
    assert out["linear_probe_acc"] < 0.2
