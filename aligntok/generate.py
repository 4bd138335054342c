"""The trained generator as one object: LightningDiT + its latent_stats + the tokenizer that decodes; the labels
and noise of each sample index, and the images as uint8 and as a labelled grid.

The DiT export it loads (aligntok.models.dit_export) carries the latent stats and the tokenizer hash in its
config.json, so sampling always de-normalises with the statistics the DiT was trained with.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aligntok.config import SampleConfig
from aligntok.data.latents import denormalize
from aligntok.models.dit_export import load_dit


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
    # text DiT: the prompt set as encoder states (P, L, D) and mask (P, L) (`set_prompts`); a sample's "label" is
    # then the index of its prompt, so the class path's label bookkeeping (parts, grids, probes) carries prompts
    prompts: tuple[torch.Tensor, torch.Tensor] | None = None
    prompt_digest: str = ""

    @property
    def is_text(self) -> bool:
        return self.config.get("task", "class") == "text"

    @property
    def num_conditions(self) -> int:
        """Classes of a class DiT; prompts of a text DiT's prompt set."""
        return len(self.prompts[0]) if self.is_text and self.prompts is not None else self.config["num_classes"]

    def set_prompts(self, hidden: torch.Tensor, mask: torch.Tensor, digest: str) -> None:
        self.prompts, self.prompt_digest = (hidden.to(self.device), mask.to(self.device).bool()), digest

    @torch.no_grad()
    def latents(self, labels: torch.Tensor, indices: list[int], sample: SampleConfig,
                cfg_scale: float | None = None) -> torch.Tensor:
        from aligntok.diffusion.sampler import sample as ode_sample

        c = self.config
        noise = sample_noise(indices, (c["in_channels"], c["input_size"], c["input_size"]), sample.seed).to(self.device)
        channels = None if sample.cfg_channels == "all" else int(sample.cfg_channels)
        scale = sample.cfg_scale if cfg_scale is None else cfg_scale
        labels = labels.to(self.device)
        if self.is_text:
            if self.prompts is None:
                raise ValueError("a text DiT samples for prompts: call Generator.set_prompts first")
            hidden, mask = self.prompts[0][labels], self.prompts[1][labels]

            def model_fn(x, t, _):  # guidance inside the model: its null caption, the sampler's interval
                return self.dit.forward_with_cfg(x, t, hidden, mask, scale, channels, sample.cfg_interval_start)
            z = ode_sample(model_fn, noise, labels, steps=sample.steps, method=sample.method,
                           timestep_shift=sample.timestep_shift)
        else:
            z = ode_sample(self.dit, noise, labels, steps=sample.steps, method=sample.method, cfg_scale=scale,
                           cfg_channels=channels, cfg_interval_start=sample.cfg_interval_start,
                           timestep_shift=sample.timestep_shift, null_class=c["num_classes"])
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


def labelled_grid(images: np.ndarray, labels: list[int], class_names: list[str] | None, cols: int,
                  wrap: bool = False):
    """A PNG-ready grid with each image's class name written above it (cut to the image's width). `wrap` (prompts of
    the text task): each name wrapped over up to four lines, small images enlarged (nearest) to a readable tile."""
    import textwrap

    from PIL import Image, ImageDraw

    n, h, w, _ = images.shape
    names = [class_names[y] if class_names else str(y) for y in labels[:n]]
    long = wrap and any(len(name) > max(1, w // 6) for name in names)
    scale = max(1, -(-160 // w)) if long else 1
    tw, th = w * scale, h * scale
    per_line = max(1, tw // 6)
    texts = [textwrap.wrap(name, per_line)[:4] if long else [name[:per_line]] for name in names]
    pad = 2 + 11 * max((len(t) for t in texts), default=1) if long else 12
    rows = -(-n // cols)
    canvas = Image.new("RGB", (cols * tw, rows * (th + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, cols)
        tile = Image.fromarray(images[i])
        canvas.paste(tile.resize((tw, th), Image.NEAREST) if scale > 1 else tile, (c * tw, r * (th + pad) + pad))
        draw.multiline_text((c * tw + 1, r * (th + pad)), "\n".join(texts[i]), fill="black", spacing=1)
    return canvas
