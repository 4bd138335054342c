"""Linear probe of a tokenizer's latents: how linearly readable is the class from z (the paper's semantic claim)?

Multinomial logistic regression (L2, full-batch L-BFGS, deterministic) on the flattened, standardised latents of
the first `train_images` train images, scored on the val split's latents. Not flip-augmented, no CFG, nothing
learned but the linear layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def encoded(tokenizer, dataset, n: int, device, batch_size: int = 64):
    """(flattened float latents on the CPU, labels) of the first n images, one batch at a time."""
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        x = torch.stack([it[0] for it in items]).to(device)
        yield tokenizer.encode(x).float().flatten(1).cpu(), torch.tensor([int(it[1]) for it in items])


def fit(z_train, y_train, num_classes: int, l2: float = 1e-3, iters: int = 100):
    """The fitted probe: a function from latents to predicted classes."""
    mean, std = z_train.mean(0), z_train.std(0).clamp_min(1e-6)
    a = ((z_train - mean) / std).double()
    w = torch.zeros(a.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, y_train) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, bias = w.detach(), bias.detach()
    return lambda z: (((z - mean) / std).double() @ w + bias).argmax(1)


def linear_probe(tokenizer, train_set, val_set, num_classes: int, device, train_images: int = 1000) -> dict:
    """Fit on the first `train_images` train latents, then score every val image batch by batch: memory is set by
    `train_images`, not by the size of the val split (50K images in the paper profile)."""
    was = tokenizer.training
    tokenizer.eval()
    z_train, y_train = map(torch.cat, zip(*encoded(tokenizer, train_set, min(train_images, len(train_set)), device)))
    classify = fit(z_train, y_train, num_classes)
    correct = 0
    for z, y in encoded(tokenizer, val_set, len(val_set), device):
        correct += int((classify(z) == y).sum())
    tokenizer.train(was)
    return {"linear_probe_acc": correct / max(1, len(val_set)), "probe_train_images": len(y_train),
            "probe_val_images": len(val_set)}
