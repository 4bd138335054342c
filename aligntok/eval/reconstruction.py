"""Tokenizer reconstruction metrics on held-out images: PSNR, SSIM, LPIPS, rFID and the semantic cosine."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def reconstruction_metrics(model, dataset, *, num_images: int, device: torch.device, lpips_fn=None,
                           extractor=None, reference=None, batch_size: int = 16) -> dict[str, float]:
    """Scores `model` (a Tokenizer) on the first `num_images` of `dataset` (image, label pairs).

    `reference` is the stage-1 tokenizer: semantic_cosine is the mean cosine (over channels, per latent token)
    between this model's latent and the stage-1 latent of the same image (1.0 for stage 1 itself).
    rFID is the Fréchet distance between features of the originals and of the reconstructions.
    """
    from aligntok.eval.metrics import feature_stats, frechet_distance
    from aligntok.eval.recon import psnr, ssim, to_uint8
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
