"""Tokenizer reconstruction on held-out images: the per-image metrics (PSNR, SSIM on [-1, 1] NCHW tensors, computed
on the [0, 1] range with data range 1) and `reconstruction_metrics`, which adds LPIPS, rFID and the semantic cosine
over a val split, split over the ranks."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float NCHW -> uint8 NCHW, rounded to nearest (values outside [-1, 1] are clamped)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _unit(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two N x C x H x W tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return (x.double() + 1) / 2, (y.double() + 1) / 2


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (inf for identical images)."""
    a, b = _unit(x, y)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse)).float()


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03, data range 1,
    mean over the valid (unpadded) windows and channels. Images smaller than 11 px use a window of their size."""
    a, b = _unit(x, y)
    c = a.shape[1]
    size = min(SSIM_WINDOW, a.shape[-1], a.shape[-2])
    w = _gaussian_window(size, SSIM_SIGMA).to(a.device)[None, None].repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


def rank_images(n: int, batch_size: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s images of [0, n): a contiguous run of whole batches [k * batch_size, (k + 1) * batch_size), so
    each image is scored in the same batch, by the same arithmetic, whatever the number of ranks."""
    from aligntok.data.dataset import contiguous_part
    batches = contiguous_part(-(-n // batch_size), rank, world_size)
    return range(min(n, batches.start * batch_size), min(n, batches.stop * batch_size))


def rank_loader(dataset, indices, batch_size: int, coord, device: torch.device,
                num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A loader of this rank's share of `dataset[i] for i in indices` (a list or range): its `rank_images`, in order,
    in whole batches of `batch_size`, decoded by `num_workers` workers (none for an empty share), pinned for CUDA."""
    mine = rank_images(len(indices), batch_size, coord.rank, coord.world_size)
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices[mine.start:mine.stop]),
                                       batch_size=batch_size, num_workers=num_workers if len(mine) else 0,
                                       pin_memory=device.type == "cuda")


PER_IMAGE = ("psnr", "ssim", "lpips", "semantic_cosine")


@torch.no_grad()
def _score(model, loader, device: torch.device, lpips_fn, extractor, reference) -> dict[str, np.ndarray]:
    """One rank's share: per-image PSNR, SSIM, LPIPS and semantic cosine (columns in PER_IMAGE order; LPIPS 0 without
    `lpips_fn`), and the extractor's features of the originals and of the reconstructions."""
    from aligntok.eval.features import full_fp32
    from aligntok.train.loop import bf16_autocast

    rows, real, fake = [], [], []
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
        with bf16_autocast(device):  # CUDA only; everything measured below is computed in full float32
            z = model.encode(x).float()
            x_rec = model.decode(z).float().clamp(-1, 1)
            z_ref = reference.encode(x).float() if reference is not None else z
        with full_fp32(device):
            lp = lpips_fn(x_rec, x).reshape(len(x)) if lpips_fn is not None else torch.zeros(len(x), device=x.device)
            cols = [psnr(x_rec, x).clamp(max=100), ssim(x_rec, x), lp,
                    F.cosine_similarity(z, z_ref, dim=1).mean(dim=(1, 2))]
        rows.append(torch.stack([c.double() for c in cols], 1).cpu().numpy())
        if extractor is not None:
            real.append(extractor(to_uint8(x))[0].numpy())
            fake.append(extractor(to_uint8(x_rec))[0].numpy())
    dim = extractor.dim if extractor is not None else 0
    return {"per_image": np.concatenate(rows) if rows else np.zeros((0, len(PER_IMAGE))),
            "real": np.concatenate(real) if real else np.zeros((0, dim)),
            "fake": np.concatenate(fake) if fake else np.zeros((0, dim))}


def reconstruction_metrics(model, dataset, *, num_images: int, device: torch.device, lpips_fn=None,
                           extractor=None, reference=None, batch_size: int = 16, coord=None,
                           num_workers: int = 0) -> dict[str, float] | None:
    """Scores `model` (a Tokenizer) on the first `num_images` of `dataset` (image, label pairs).

    `reference` is the stage-1 tokenizer: semantic_cosine is the mean cosine (over channels, per latent token)
    between this model's latent and the stage-1 latent of the same image (1.0 for stage 1 itself).
    rFID is the Fréchet distance between features of the originals and of the reconstructions.

    Every rank of `coord` (None: this process alone) scores its `rank_images` on `device`, decoded by `num_workers`
    loader workers; rank 0 gathers the per-image numbers and feature rows in image order and returns the metrics
    (None on the other ranks). The numbers are those of one rank: same batches, same sums in the same order.
    """
    from aligntok.eval.coord import Coord
    from aligntok.eval.metrics import feature_stats, frechet_distance

    coord = coord if coord is not None else Coord()
    n = min(num_images, len(dataset))
    loader = rank_loader(dataset, range(n), batch_size, coord, device, num_workers)
    modes = [(m, m.training) for m in (model, reference) if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        part = _score(model, loader, device, lpips_fn, extractor, reference)
    finally:
        for m, mode in modes:
            m.train(mode)
    parts = coord.gather(part)
    if parts is None:
        return None
    # ranks hold consecutive runs of images: rank order is image order
    per_image = np.concatenate([p["per_image"] for p in parts])
    out = {k: float(per_image[:, i].sum() / n) for i, k in enumerate(PER_IMAGE)}
    if lpips_fn is None:
        out.pop("lpips")
    if extractor is not None:
        real, fake = (np.concatenate([p[side] for p in parts]) for side in ("real", "fake"))
        out["rfid"] = frechet_distance(*feature_stats(real), *feature_stats(fake))
    out["num_images"] = n
    return out
