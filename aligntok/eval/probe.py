"""Linear probe of a tokenizer's latents: how linearly readable is the class from z (the paper's semantic claim)?

Multinomial logistic regression (L2, full-batch L-BFGS, deterministic) on the flattened, standardised latents of
the first `train_images` train images, scored on the val split's latents. Not flip-augmented, no CFG, nothing
learned but the linear layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def encode_all(tokenizer, dataset, n: int, device, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    zs, ys = [], []
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        x = torch.stack([it[0] for it in items]).to(device)
        zs.append(tokenizer.encode(x).float().flatten(1).cpu())
        ys.append(torch.tensor([int(it[1]) for it in items]))
    return torch.cat(zs), torch.cat(ys)


def fit_and_score(z_train, y_train, z_test, y_test, num_classes: int, l2: float = 1e-3, iters: int = 100) -> float:
    mean, std = z_train.mean(0), z_train.std(0).clamp_min(1e-6)
    a, b = ((z_train - mean) / std).double(), ((z_test - mean) / std).double()
    w = torch.zeros(a.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, y_train) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((b @ w + bias).argmax(1) == y_test).double().mean())


def linear_probe(tokenizer, train_set, val_set, num_classes: int, device, train_images: int = 1000) -> dict:
    was = tokenizer.training
    tokenizer.eval()
    z_train, y_train = encode_all(tokenizer, train_set, min(train_images, len(train_set)), device)
    z_val, y_val = encode_all(tokenizer, val_set, len(val_set), device)
    tokenizer.train(was)
    acc = fit_and_score(z_train, y_train, z_val, y_val, num_classes)
    return {"linear_probe_acc": acc, "probe_train_images": len(y_train), "probe_val_images": len(y_val)}
