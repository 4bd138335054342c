"""The DiT export: `config.json` + `model.safetensors` (EMA weights), written atomically, and checked against its
own config and the current tokenizer before any weight is loaded. The latent stats and the tokenizer hash travel
in config.json (see aligntok.generate)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

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


def build_from_config(config: dict) -> torch.nn.Module:
    """The DiT an export's config.json describes: class-conditional (`task` class, the default of exports made
    before the text task) or text-conditioned (`task` text: `text_dim` is the caption encoder's width)."""
    if config.get("task", "class") == "text":
        from aligntok.models.t2i_dit import build_t2i_dit
        return build_t2i_dit(config["model"], input_size=config["input_size"], in_channels=config["in_channels"],
                             text_dim=config["text_dim"], qk_norm=config.get("qk_norm", True))
    from aligntok.models.dit import build_dit
    return build_dit(config["model"], input_size=config["input_size"], in_channels=config["in_channels"],
                     num_classes=config["num_classes"], qk_norm=config.get("qk_norm", False))


def _dit_config(model_dir: Path) -> dict:
    for name in ("config.json", "model.safetensors"):
        if not (model_dir / name).exists():
            raise DitLoadError(f"{model_dir / name}: DiT export not found; run `aligntok train-dit` first")
    try:
        config = json.loads((model_dir / "config.json").read_text())
        [config[k] for k in ("model", "input_size", "in_channels", "num_classes", "tokenizer_hash")]
        if config.get("task", "class") == "text":
            [config[k] for k in ("text_dim", "text_encoder", "max_tokens")]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as e:
        raise DitLoadError(f"{model_dir / 'config.json'}: not a DiT export config ({type(e).__name__}: {e}); "
                           "re-run `aligntok train-dit`") from None
    return config


def check_dit(model_dir: Path, tokenizer_dir: Path | None = None) -> dict:
    """The export's config.json, after checking, without loading any weights, that model.safetensors holds
    exactly the tensors (names and shapes) that config describes and, given `tokenizer_dir`, that the DiT takes
    the latents that tokenizer makes (channels, then the tokenizer's hash). Raises DitLoadError."""
    from safetensors import safe_open

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
        expected = {k: list(v.shape) for k, v in build_from_config(config).state_dict().items()}
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
    model_dir = Path(model_dir)
    config = check_dit(model_dir, tokenizer_dir)
    model = build_from_config(config)
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    return model.to(device).eval(), config
