"""Linear probe of a tokenizer's latents: how linearly readable is the class from z (the paper's semantic claim)?

Multinomial logistic regression (L2, full-batch L-BFGS, deterministic) on the flattened, standardised latents of a
class-stratified sample of the train split (`per_class` images of every class, drawn with a seeded permutation),
scored on the val split's latents. Not flip-augmented, no CFG, nothing learned but the linear layer. A split with a
class short of `per_class` images gets no score but the reason: fewer would make the probe a noisy few-shot fit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def stratified(labels: list[int], num_classes: int, per_class: int, seed: int = 0) -> list[int] | str:
    """Sorted indices of `per_class` images of every class, drawn in the order of a seeded permutation; or, when
    some class has fewer, why not."""
    picked: list[list[int]] = [[] for _ in range(num_classes)]
    for i in torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist():
        if len(picked[labels[i]]) < per_class:
            picked[labels[i]].append(i)
    short = [c for c in range(num_classes) if len(picked[c]) < per_class]
    if short:
        return (f"{len(short)} of {num_classes} classes have fewer than eval.probe_per_class={per_class} train "
                f"images (class {short[0]}: {len(picked[short[0]])})")
    return sorted(i for idx in picked for i in idx)


def labels_of(dataset) -> list[int]:
    """Every label of a split: a ShardDataset reads its label column (no image decoding); a plain sequence of
    (image, label) pairs is read item by item."""
    labels = getattr(dataset, "labels", None)
    return [int(y) for y in (labels if labels is not None else (item[1] for item in dataset))]


@torch.no_grad()
def encoded(tokenizer, dataset, indices: list[int], device, batch_size: int = 64):
    """(flattened float latents on the CPU, labels) of the images at `indices`, one batch at a time."""
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start:start + batch_size]]
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


def linear_probe(tokenizer, train_set, val_set, num_classes: int, device, per_class: int = 10, seed: int = 0) -> dict:
    """Fit on `per_class` train latents of every class, then score every val image batch by batch: memory is set
    by the sample, not by the size of the val split (50K images in the paper profile). Returns the accuracy and the
    sample's counts, or only `probe_na` (the reason) when the train split has too few images of some class."""
    picked = stratified(labels_of(train_set), num_classes, per_class, seed)
    if isinstance(picked, str):
        return {"probe_na": picked}
    was = tokenizer.training
    tokenizer.eval()
    z_train, y_train = map(torch.cat, zip(*encoded(tokenizer, train_set, picked, device)))
    classify = fit(z_train, y_train, num_classes)
    correct = 0
    for z, y in encoded(tokenizer, val_set, list(range(len(val_set))), device):
        correct += int((classify(z) == y).sum())
    tokenizer.train(was)
    return {"linear_probe_acc": correct / max(1, len(val_set)), "probe_train_images": len(y_train),
            "probe_val_images": len(val_set)}
