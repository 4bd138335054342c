"""Tokenizer reconstruction on held-out images: the per-image metrics (PSNR, SSIM on [-1, 1] NCHW tensors, computed
on the [0, 1] range with data range 1) and `reconstruction_metrics`, which adds LPIPS, rFID and the semantic cosine
over a val split."""
from __future__ import annotations

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


@torch.no_grad()
def reconstruction_metrics(model, dataset, *, num_images: int, device: torch.device, lpips_fn=None,
                           extractor=None, reference=None, batch_size: int = 16) -> dict[str, float]:
    """Scores `model` (a Tokenizer) on the first `num_images` of `dataset` (image, label pairs).

    `reference` is the stage-1 tokenizer: semantic_cosine is the mean cosine (over channels, per latent token)
    between this model's latent and the stage-1 latent of the same image (1.0 for stage 1 itself).
    rFID is the Fréchet distance between features of the originals and of the reconstructions.
    """
    from aligntok.eval.metrics import feature_stats, frechet_distance
    from aligntok.train.loop import bf16_autocast

    was_training = model.training
    model.eval()
    if reference is not None:
        reference.eval()
    n = min(num_images, len(dataset))
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0, "semantic_cosine": 0.0}
    real_feats, fake_feats = [], []
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        x = torch.stack([it[0] for it in items]).to(device)
        with bf16_autocast(device):  # CUDA only; the metrics below are computed in float32
            z = model.encode(x).float()
            x_rec = model.decode(z).float().clamp(-1, 1)
        sums["psnr"] += float(psnr(x_rec, x).clamp(max=100).sum())
        sums["ssim"] += float(ssim(x_rec, x).sum())
        if lpips_fn is not None:
            sums["lpips"] += float(lpips_fn(x_rec, x).sum())
        with bf16_autocast(device):
            z_ref = reference.encode(x).float() if reference is not None else z
        sums["semantic_cosine"] += float(F.cosine_similarity(z, z_ref, dim=1).mean(dim=(1, 2)).sum())
        if extractor is not None:
            real_feats.append(extractor(to_uint8(x).cpu())[0])
            fake_feats.append(extractor(to_uint8(x_rec).cpu())[0])
    model.train(was_training)
    out = {k: v / n for k, v in sums.items()}
    if lpips_fn is None:
        out.pop("lpips")
    if extractor is not None:
        real, fake = torch.cat(real_feats).numpy(), torch.cat(fake_feats).numpy()
        out["rfid"] = frechet_distance(*feature_stats(real), *feature_stats(fake))
    out["num_images"] = n
    return out
