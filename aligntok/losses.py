"""Tokenizer losses: L1 + LPIPS + KL + adaptive hinge GAN (LDM's LPIPSWithDiscriminator), semantic preservation."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from aligntok.models.discriminator import hinge_d_loss, hinge_g_loss
from aligntok.weights import cached_download

# LPIPS trunk -> torchvision's ImageNet weights enum (what lpips' `tv.<net>(pretrained=True)` loads)
_TORCHVISION_WEIGHTS = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights", "squeeze": "SqueezeNet1_1_Weights"}


class LPIPSError(RuntimeError):
    """The LPIPS backbone weights could not be obtained."""


def resolve_lpips_weights(net: str = "vgg", pretrained_backbone: bool = True) -> list[Path]:
    """The files `build_lpips` loads: the calibrated linear heads shipped in the lpips package and, with a
    pretrained backbone, torchvision's ImageNet trunk in $TORCH_HOME/hub/checkpoints (where torchvision looks),
    downloaded there now when missing and online. LPIPSError in one line naming the param otherwise."""
    import lpips
    import torchvision

    if net not in _TORCHVISION_WEIGHTS:
        raise ValueError(f"unknown LPIPS net {net!r}; known: {sorted(_TORCHVISION_WEIGHTS)}")
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    if not heads.is_file():
        raise LPIPSError(f"lpips.net: the lpips package lacks its {net} heads ({heads}); reinstall lpips")
    if not pretrained_backbone:
        return [heads]
    url = torchvision.models.get_weight(f"{_TORCHVISION_WEIGHTS[net]}.IMAGENET1K_V1").url
    trunk = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not cached_download(url, trunk):
        raise LPIPSError(f"lpips.pretrained_backbone: the torchvision {net} trunk {trunk.name} is not in "
                         f"{trunk.parent} and cannot be downloaded; put it there ({url}), or set "
                         f"lpips.pretrained_backbone=false for an offline random backbone (not a perceptual metric)")
    return [heads, trunk]


def build_lpips(net: str = "vgg", pretrained_backbone: bool = True) -> nn.Module:
    """Frozen LPIPS (inputs in [-1, 1]). pretrained_backbone=False: random trunk (always drawn from seed 0, so the
    number is comparable across runs and stages), calibrated linear heads; an image distance for offline smoke
    runs, not a perceptual metric."""
    import lpips

    resolve_lpips_weights(net, pretrained_backbone)
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecated `pretrained=` inside lpips
            torch.manual_seed(0)
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=not pretrained_backbone, verbose=False)
    except Exception as e:
        raise LPIPSError(f"lpips.pretrained_backbone: cannot load the LPIPS {net} model ({type(e).__name__}: "
                         f"{e})".splitlines()[0]) from e
    return FrozenLPIPS(model)


class FrozenLPIPS(nn.Module):
    """LPIPS kept in eval mode (its heads have dropout) and without trainable parameters."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.model(a, b)


def semantic_preservation_loss(z: torch.Tensor, z_ref: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Stage 2: keep z0 close to the frozen stage-1 encoder+adapter latent, measured after the adapter.

    'mse' is the paper's plain L2 (mean squared error over all elements); 'cosine' (ablation) is
    1 - cos(z, z_ref) over channels, averaged over tokens.
    """
    z_ref = z_ref.detach()
    if kind == "mse":
        return F.mse_loss(z, z_ref)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(z, z_ref, dim=1, eps=1e-8)).mean()
    raise ValueError(f"unknown semantic preservation distance {kind!r} (mse | cosine)")


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over latent elements, averaged over the batch (as LDM)."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


class ReconstructionLoss(nn.Module):
    """nll = l1_weight*|x - x_rec| + lpips_weight*LPIPS; + kl_weight*KL; + d_weight * (-mean D(x_rec)).

    d_weight = disc_weight * ||dnll/dlast|| / (||dg/dlast|| + 1e-4), clamped to [0, 1e4] (LDM's adaptive
    weight, balancing the GAN gradient against the reconstruction gradient at the decoder's last layer),
    active only from step >= disc_start.
    """

    def __init__(self, lpips_module: nn.Module | None, l1_weight: float = 1.0, lpips_weight: float = 1.0,
                 kl_weight: float = 1e-6, disc_weight: float = 0.5, disc_start: int = 5001,
                 discriminator: nn.Module | None = None):
        super().__init__()
        self.lpips = lpips_module
        self.l1_weight, self.lpips_weight, self.kl_weight = l1_weight, lpips_weight, kl_weight
        self.disc_weight, self.disc_start = disc_weight, disc_start
        # a plain attribute, not a submodule: the discriminator is owned (saved, optimised) by the caller
        self.__dict__["discriminator"] = discriminator

    def __setattr__(self, name, value):
        if name == "discriminator":
            self.__dict__["discriminator"] = value
        else:
            super().__setattr__(name, value)

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and self.disc_weight > 0 and step >= self.disc_start

    def adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and last_layer.requires_grad and nll.requires_grad):
            return torch.zeros((), device=nll.device)  # evaluation: no gradients to balance (LDM uses 0)
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
        return d_weight.clamp(0.0, 1e4).detach() * self.disc_weight

    def generator_loss(self, x, x_rec, mean, logvar, last_layer, step: int):
        l1 = (x - x_rec).abs().mean()
        nll = self.l1_weight * l1
        logs = {"l1": l1.detach()}
        if self.lpips is not None and self.lpips_weight > 0:
            p = self.lpips(x_rec, x).mean()
            nll = nll + self.lpips_weight * p
            logs["lpips"] = p.detach()
        loss = nll
        logs["nll"] = nll.detach()
        if logvar is not None and self.kl_weight > 0:
            kl = kl_loss(mean, logvar)
            loss = loss + self.kl_weight * kl
            logs["kl"] = kl.detach()
        if self.gan_active(step):
            g = hinge_g_loss(self.discriminator(x_rec))
            d_weight = self.adaptive_weight(nll, g, last_layer)
            loss = loss + d_weight * g
            logs.update(g_loss=g.detach(), d_weight=d_weight.detach())
        return loss, logs

    def discriminator_loss(self, x, x_rec, step: int):
        if not self.gan_active(step):
            return None, {}
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(x_rec.detach())
        d = hinge_d_loss(logits_real, logits_fake)
        return d, {"d_loss": d.detach(), "logits_real": logits_real.detach().mean(),
                   "logits_fake": logits_fake.detach().mean()}
