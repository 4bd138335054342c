"""The trained generator as one object: LightningDiT + its latent_stats + the tokenizer that decodes.

Saved as `config.json` + `model.safetensors` (EMA weights). The latent stats and the tokenizer hash travel in
config.json, so sampling always de-normalises with the statistics the DiT was trained with.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from aligntok.config import SampleConfig
from aligntok.data.latents import denormalize
from aligntok.io import replace_dir, save_safetensors, write_error, write_json_atomic


def save_dit(model: torch.nn.Module, out_dir: Path, config: dict) -> None:
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                         tmp / "model.safetensors")
        write_json_atomic(tmp / "config.json", config)
    except OSError as e:  # a full disk: one line, and the previous export (if any) untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(out_dir / "model.safetensors", e) from None
    replace_dir(tmp, out_dir)


class DitLoadError(ValueError):
    """A DiT export that is missing, unreadable, or does not fit its own config or the current latents: one line
    naming the file and the mismatch (the CLI exits with code 2)."""


def _dit_config(model_dir: Path) -> dict:
    for name in ("config.json", "model.safetensors"):
        if not (model_dir / name).exists():
            raise DitLoadError(f"{model_dir / name}: DiT export not found; run `aligntok train-dit` first")
    try:
        config = json.loads((model_dir / "config.json").read_text())
        [config[k] for k in ("model", "input_size", "in_channels", "num_classes", "tokenizer_hash")]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as e:
        raise DitLoadError(f"{model_dir / 'config.json'}: not a DiT export config ({type(e).__name__}: {e}); "
                           "re-run `aligntok train-dit`") from None
    return config


def check_dit(model_dir: Path, tokenizer_dir: Path | None = None) -> dict:
    """The export's config.json, after checking, without loading any weights, that model.safetensors holds
    exactly the tensors (names and shapes) that config describes and, given `tokenizer_dir`, that the DiT takes
    the latents that tokenizer makes (channels, then the tokenizer's hash). Raises DitLoadError."""
    from safetensors import safe_open

    from aligntok.models.dit import build_dit

    model_dir = Path(model_dir)
    config = _dit_config(model_dir)
    weights = model_dir / "model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: whatever safetensors raises, one line
        raise DitLoadError(f"{weights}: unreadable safetensors file ({str(e).splitlines()[0][:120]}); "
                           "re-run `aligntok train-dit`") from None
    with torch.device("meta"):  # shapes only: nothing allocated
        expected = {k: list(v.shape) for k, v in build_dit(
            config["model"], input_size=config["input_size"], in_channels=config["in_channels"],
            num_classes=config["num_classes"], qk_norm=config.get("qk_norm", False)).state_dict().items()}
    for key in expected:
        if shapes.get(key) != expected[key]:
            got = "missing" if key not in shapes else f"shape {shapes[key]}"
            raise DitLoadError(f"{weights}: tensor {key!r} is {got}, but config.json ({config['model']}, "
                               f"in_channels {config['in_channels']}) expects {expected[key]}; the weights and "
                               "config.json come from different DiTs")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise DitLoadError(f"{weights}: {len(extra)} tensor(s) config.json does not describe ({extra[0]!r}, ...)")
    if tokenizer_dir is not None:
        tok_config = Path(tokenizer_dir) / "config.json"
        try:
            channels = int(json.loads(tok_config.read_text())["latent_channels"])
        except (OSError, ValueError, KeyError, TypeError):
            channels = None  # the tokenizer's own loader reports a broken folder
        if channels is not None and channels != config["in_channels"]:
            raise DitLoadError(f"{model_dir}: DiT takes {config['in_channels']}-channel latents, but the tokenizer "
                               f"{tokenizer_dir} makes {channels}-channel latents; re-run cache-latents and train-dit")
        from aligntok.fingerprint import tokenizer_hash
        current = tokenizer_hash(tokenizer_dir)
        if config["tokenizer_hash"] != current:
            raise DitLoadError(f"{model_dir}: DiT was trained on latents of tokenizer {config['tokenizer_hash']}, "
                               f"but {tokenizer_dir} is {current}; re-run cache-latents and train-dit")
    return config


def load_dit(model_dir: Path, device: torch.device | str = "cpu", tokenizer_dir: Path | None = None):
    from aligntok.models.dit import build_dit

    model_dir = Path(model_dir)
    config = check_dit(model_dir, tokenizer_dir)
    model = build_dit(config["model"], input_size=config["input_size"], in_channels=config["in_channels"],
                      num_classes=config["num_classes"], qk_norm=config.get("qk_norm", False))
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    return model.to(device).eval(), config


def sample_labels(indices, num_classes: int, mode: str, seed: int) -> torch.Tensor:
    """Class of each sample index. 'balanced': index i gets class i % C (ADM's fixed N/C per class); 'random':
    a splitmix64 hash of (seed, i) mod C. Either way label i depends only on (seed, i): the same labels come
    out on 1 or N ranks and for any sample count, so a larger run reuses a smaller run's samples."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if mode == "balanced":
        return torch.from_numpy(idx % num_classes)
    if mode != "random":
        raise ValueError(f"eval.labels: given {mode!r}; expected 'balanced' or 'random'")
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        x = idx.astype(np.uint64) + np.uint64(seed % 2**64) * np.uint64(0x9E3779B97F4A7C15)
        for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            x = (x ^ (x >> np.uint64(shift))) * np.uint64(mult)
        x = x ^ (x >> np.uint64(31))
    return torch.from_numpy((x % np.uint64(num_classes)).astype(np.int64))


def sample_noise(indices: list[int], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Noise for sample i depends only on (seed, i): the same images come out on 1 or N ranks."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                        for i in indices])


@dataclass
class Generator:
    dit: torch.nn.Module
    config: dict
    tokenizer: torch.nn.Module
    device: torch.device
    dit_hash: str = ""  # digest of the DiT weights file (load_generator fills it): part of the sample cache key

    @torch.no_grad()
    def latents(self, labels: torch.Tensor, indices: list[int], sample: SampleConfig,
                cfg_scale: float | None = None) -> torch.Tensor:
        from aligntok.diffusion.sampler import sample as ode_sample

        c = self.config
        noise = sample_noise(indices, (c["in_channels"], c["input_size"], c["input_size"]), sample.seed).to(self.device)
        channels = None if sample.cfg_channels == "all" else int(sample.cfg_channels)
        z = ode_sample(self.dit, noise, labels.to(self.device), steps=sample.steps, method=sample.method,
                       cfg_scale=sample.cfg_scale if cfg_scale is None else cfg_scale, cfg_channels=channels,
                       cfg_interval_start=sample.cfg_interval_start, timestep_shift=sample.timestep_shift,
                       null_class=c["num_classes"])
        return denormalize(z.float(), c["latent_stats"])

    @torch.no_grad()
    def images(self, labels, indices, sample: SampleConfig, cfg_scale: float | None = None,
               amp: bool = False) -> torch.Tensor:
        """Generated images in [-1, 1], Bx3xHxW (float32). `amp`: bf16 autocast for the DiT and the decoder,
        on CUDA only (inert on CPU, where bf16 matmuls are slower and the numbers would change)."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and self.device.type == "cuda"):
            x = self.tokenizer.decode(self.latents(labels, indices, sample, cfg_scale))
        return x.float().clamp(-1, 1)


def load_generator(dit_dir: Path, tokenizer_dir: Path, device: torch.device) -> Generator:
    from aligntok.models.tokenizer import AlignTokenizer

    dit, config = load_dit(dit_dir, device, tokenizer_dir)  # checked against the tokenizer's latents first
    from aligntok.fingerprint import file_hash

    tokenizer = AlignTokenizer.from_pretrained(tokenizer_dir).to(device).eval()
    return Generator(dit, config, tokenizer, device, dit_hash=file_hash(Path(dit_dir) / "model.safetensors"))


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    return ((x.permute(0, 2, 3, 1).float().cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def labelled_grid(images: np.ndarray, labels: list[int], class_names: list[str] | None, cols: int):
    """A PNG-ready grid with each image's class name written above it."""
    from PIL import Image, ImageDraw

    n, h, w, _ = images.shape
    rows = -(-n // cols)
    pad = 12
    canvas = Image.new("RGB", (cols * w, rows * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas.paste(Image.fromarray(images[i]), (c * w, r * (h + pad) + pad))
        name = class_names[labels[i]] if class_names else str(labels[i])
        draw.text((c * w + 1, r * (h + pad)), name[: max(1, w // 6)], fill="black")
    return canvas
