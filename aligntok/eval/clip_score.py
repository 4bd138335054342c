"""CLIP score of generated images against their prompts (params `text.clip_model`).

The definition is the text-to-image literature's (torchmetrics' CLIPScore, from Hessel et al. 2021's CLIP-S):
per pair, 100 * max(cos(E_image, E_text), 0), with E the CLIP's projected embeddings, averaged over the pairs.
Hessel et al. weight by w = 2.5 instead of 100 (CLIP-S); torchmetrics clamps the mean rather than each pair. Both
agree with this one whenever no pair has a negative cosine, which a trained CLIP gives to matched pairs almost
always (their cosines sit around 0.2 to 0.35); the per-pair clamp is the definition as written.

Preprocessing is the CLIP's own (`CLIPImageProcessor` from the model's folder): shorter side resized to the
model's image size with bicubic resampling, centre crop, rescale to [0, 1], the model's mean/std. Prompts are
tokenised by the folder's tokenizer and cut to the text tower's max positions (77 for OpenAI's CLIPs).

Which CLIP is part of the protocol, not a detail: scores from different CLIPs are not comparable. The paper-scale
protocol uses openai/clip-vit-large-patch14 (ViT-L/14 at 224 px), the common choice for text-to-image CLIP scores
at 256 px; some papers report ViT-B/32 or OpenCLIP ViT-g/14 instead. `text.clip_model` names it, and a report
should carry that name beside the number.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

FIELD = "text.clip_model"
EXAMPLE = "openai/clip-vit-large-patch14"
NEEDED = "a CLIP folder (config.json, model.safetensors, tokenizer files, preprocessor_config.json)"


class ClipModelError(ValueError):
    """`text.clip_model` names no usable CLIP; the message is one line."""


def resolve_clip(name: str) -> str:
    """The local folder of CLIP `name`: an existing folder, or a Hugging Face id already in the local cache (never
    downloaded here: the evaluation runs offline). Anything else raises ClipModelError naming text.clip_model."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ClipModelError(f"{FIELD}: folder {path} has no config.json; expected {NEEDED}")
        return str(path)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or name.startswith((".", "/")) or "--" in name:
        raise ClipModelError(f"{FIELD}: given {name!r}, which is neither an existing folder nor a Hugging Face id; "
                             f"expected {NEEDED} or a cached id such as {EXAMPLE}")
    from huggingface_hub import snapshot_download
    try:
        folder = snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError), or a malformed cache entry
        raise ClipModelError(f"{FIELD}: {name!r} is not in the local Hugging Face cache; expected a cached id "
                             f"(huggingface-cli download {name}) or {NEEDED}") from None
    if not (Path(folder) / "config.json").is_file():
        raise ClipModelError(f"{FIELD}: cached {name!r} has no config.json; expected {NEEDED}")
    return folder


def load_clip(model_dir: str, device: torch.device | str = "cpu"):
    """(CLIPModel in eval mode on `device`, tokenizer, CLIPImageProcessor) from a resolved folder, offline and from
    safetensors only; a folder that is not such a CLIP raises ClipModelError."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
    folder = resolve_clip(model_dir)
    try:
        model = CLIPModel.from_pretrained(folder, use_safetensors=True, local_files_only=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ClipModelError(f"{FIELD}: {folder} does not load as a CLIP ({first}); expected {NEEDED}") from None
    size = crop_size(processor)
    if size != model.config.vision_config.image_size:
        raise ClipModelError(f"{FIELD}: {folder}: the image processor crops to {size} px, the vision tower takes "
                             f"{model.config.vision_config.image_size} px; expected the two to agree")
    return model.eval().to(device), tokenizer, processor


def crop_size(processor) -> int:
    crop = processor.crop_size
    return int(crop["height"] if isinstance(crop, dict) else crop.height)


def preprocess_images(processor, images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> the CLIP's float32 pixel_values (N, 3, S, S): resize, centre crop, normalise."""
    out = processor(images=list(images), return_tensors="pt", input_data_format="channels_last")
    return out["pixel_values"].float()


def _features(out) -> torch.Tensor:
    """get_*_features returns the projected embeddings (transformers 4) or an output holding them (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _check(images, prompts) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        shape = getattr(images, "shape", None)
        raise ValueError(f"clip_score images: given {type(images).__name__} {shape} "
                         f"{getattr(images, 'dtype', '')}; expected a uint8 array (N, H, W, 3)")
    if len(prompts) != len(images) or not len(images):
        raise ValueError(f"clip_score prompts: given {len(prompts)} for {len(images)} images; expected one prompt "
                         "per image, at least one")


@torch.no_grad()
def pair_cosines(model, tokenizer, processor, images: np.ndarray, prompts: list[str],
                 batch_size: int = 64) -> np.ndarray:
    """cos(E_image, E_text) of each (image, prompt) pair, float64 (N,)."""
    _check(images, prompts)
    device = next(model.parameters()).device
    max_len = model.config.text_config.max_position_embeddings
    cosines = []
    for start in range(0, len(images), batch_size):
        pixels = preprocess_images(processor, images[start:start + batch_size]).to(device)
        tokens = tokenizer(list(prompts[start:start + batch_size]), padding=True, truncation=True,
                           max_length=max_len, return_tensors="pt").to(device)
        img = _features(model.get_image_features(pixel_values=pixels)).float()
        txt = _features(model.get_text_features(input_ids=tokens["input_ids"],
                                                attention_mask=tokens["attention_mask"])).float()
        cosines.append(torch.nn.functional.cosine_similarity(img, txt, dim=-1).double().cpu())
    return torch.cat(cosines).numpy()


def score_from_cosines(cosines: np.ndarray) -> float:
    """100 * max(cos, 0), averaged over the pairs."""
    return float(100.0 * np.maximum(np.asarray(cosines, dtype=np.float64), 0.0).mean())


def clip_score(model_dir: str, images: np.ndarray, prompts: list[str], device: torch.device | str = "cpu",
               batch_size: int = 64) -> float:
    """CLIP score (0 to 100) of uint8 images (N, H, W, 3) against their prompts, with the CLIP at `model_dir` (a
    folder or a cached Hugging Face id, params `text.clip_model`), `batch_size` pairs at a time on `device`."""
    if batch_size < 1:
        raise ValueError(f"clip_score batch_size: given {batch_size}; expected >= 1")
    _check(images, prompts)
    model, tokenizer, processor = load_clip(model_dir, device)
    return score_from_cosines(pair_cosines(model, tokenizer, processor, images, prompts, batch_size))
