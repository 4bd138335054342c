"""Linear probe of a tokenizer's latents: how linearly readable is the class from z (the paper's semantic claim)?

Multinomial logistic regression (L2, full-batch L-BFGS, deterministic) on the flattened, standardised latents of a
class-stratified sample of the train split (`per_class` images of every class, drawn with a seeded permutation),
scored on the val split's latents. Not flip-augmented, no CFG, nothing learned but the linear layer. A split with a
class short of `per_class` images gets no score but the reason: fewer would make the probe a noisy few-shot fit.

Every rank encodes its share of the images on its own device, in whole batches (`rank_images`), so each latent is
computed in the same batch whatever the number of ranks: rank 0 gathers the train latents in image order and fits,
every rank classifies its val share with the fitted probe, and the numbers are those of one rank.
"""
from __future__ import annotations

from typing import NamedTuple

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
def encoded(tokenizer, loader, device):
    """(flattened float latents on the CPU, labels) of each batch of `loader`, encoded on `device`."""
    for x, y in loader:
        yield tokenizer.encode(x.to(device, non_blocking=True)).float().flatten(1).cpu(), y


def rank_latents(tokenizer, dataset, indices, device, coord, batch_size: int = 64,
                 num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, labels) of this rank's share of the images at `indices` (`rank_loader`), in image order."""
    from aligntok.eval.reconstruction import rank_loader

    batches = list(encoded(tokenizer, rank_loader(dataset, indices, batch_size, coord, device, num_workers), device))
    if not batches:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return tuple(map(torch.cat, zip(*batches)))


class Probe(NamedTuple):
    """A fitted probe: standardisation and the linear layer (plain tensors, so rank 0 can send it to the others)."""
    mean: torch.Tensor
    std: torch.Tensor
    w: torch.Tensor
    bias: torch.Tensor

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """Predicted classes of latents `z`."""
        return (((z - self.mean) / self.std).double() @ self.w + self.bias).argmax(1)


def fit(z_train, y_train, num_classes: int, l2: float = 1e-3, iters: int = 100) -> Probe:
    """The probe fitted to (latents, labels)."""
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
    return Probe(mean, std, w.detach(), bias.detach())


def linear_probe(tokenizer, train_set, val_set, num_classes: int, device, per_class: int = 10, seed: int = 0, *,
                 coord=None, batch_size: int = 64, num_workers: int = 0) -> dict | None:
    """Fit on `per_class` train latents of every class, then score the val images, each rank its share batch by batch:
    memory is set by the sample, not by the size of the val split (50K images in the paper profile). Returns, on rank
    0 of `coord` (None: this process alone; None on the other ranks), the accuracy and the sample's counts, or only
    `probe_na` (the reason) when the train split has too few images of some class."""
    from aligntok.eval.coord import Coord
    from aligntok.eval.reconstruction import rank_loader

    coord = coord if coord is not None else Coord()
    # rank 0 alone reads the label column (1.28M rows for ImageNet)
    picked = coord.broadcast(stratified(labels_of(train_set), num_classes, per_class, seed) if coord.is_main else None)
    if isinstance(picked, str):
        return {"probe_na": picked} if coord.is_main else None
    was = tokenizer.training
    tokenizer.eval()
    try:
        parts = coord.gather(rank_latents(tokenizer, train_set, picked, device, coord, batch_size, num_workers))
        # ranks hold consecutive runs of images: rank order is image order
        probe = fit(*map(torch.cat, zip(*(p for p in parts if len(p[1])))), num_classes) if parts else None
        probe = coord.broadcast(probe)
        val = rank_loader(val_set, range(len(val_set)), batch_size, coord, device, num_workers)
        correct = sum(int((probe(z) == y).sum()) for z, y in encoded(tokenizer, val, device))
    finally:
        tokenizer.train(was)
    counts = coord.gather(correct)
    if counts is None:
        return None
    return {"linear_probe_acc": sum(counts) / max(1, len(val_set)), "probe_train_images": len(picked),
            "probe_val_images": len(val_set)}
