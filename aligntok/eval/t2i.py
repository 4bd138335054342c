"""Text-to-image evaluation: the prompt set, its encoder states, its reference images, and the caption judge.

The prompt set is `text.prompts` (one caption per line; the paper profile: COCO-2014 val captions) with its
reference images in `text.prompt_images`, or, when no file is given, the prepared val split: its captions are the
prompts and its images the reference (for the captioned synthetic scenes: held-out scenes). Sample i is drawn for
prompt i mod P (each prompt once when eval.num_samples == P). FD/FID compare the samples with the reference
images; on scenes the caption judge reads every attribute of each sample back and compares it with its prompt.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from aligntok.config import Params


class PromptError(ValueError):
    """A prompt set that cannot be used (one line naming the file or field)."""


def prompt_set(params: Params, data_dir: Path, limit: int) -> tuple[list[str], str]:
    """(the first `limit` prompts, where they come from)."""
    if params.text.prompts:
        from aligntok.data.prompts import read_prompts
        prompts = read_prompts(params.text.prompts)[:limit]
        return prompts, f"{params.text.prompts} (first {len(prompts)} lines)"
    from aligntok.data.captions import iter_captions
    prompts = []
    for caption in iter_captions(data_dir, "val"):
        if len(prompts) == limit:
            break
        prompts.append(caption)
    if not prompts:
        raise PromptError(f"{data_dir}: the val split has no captions; expected a val split (data.val_fraction > 0) "
                          "or text.prompts")
    return prompts, f"the val split's captions (first {len(prompts)})"


@torch.no_grad()
def encode_prompts(params: Params, prompts: list[str], device, dit_config: dict):
    """(states (P, L, D), mask (P, L), digest) of the prompts, by the encoder the DiT was trained with."""
    from aligntok.models.text_encoder import TextEncoder
    encoder = TextEncoder.load(params.text.encoder, params.text.max_tokens, device)
    trained = dit_config.get("text_encoder_hash")
    if trained and encoder.hash != trained:
        raise PromptError(f"text.encoder: {params.text.encoder!r} (max_tokens {params.text.max_tokens}) is not the "
                          f"encoder the DiT was trained with ({dit_config.get('text_encoder')}); expected the same")
    if encoder.dim != dit_config["text_dim"]:
        raise PromptError(f"text.encoder: {params.text.encoder!r} gives {encoder.dim}-d states; the DiT expects "
                          f"{dit_config['text_dim']}-d")
    states, masks = [], []
    for start in range(0, len(prompts), params.text.batch_size):
        h, m = encoder.encode(prompts[start:start + params.text.batch_size])
        states.append(h.float().cpu())
        masks.append(m.cpu())
    digest = hashlib.sha256(json.dumps([trained, params.text.max_tokens, prompts]).encode()).hexdigest()[:16]
    return torch.cat(states), torch.cat(masks), digest


def attach_prompts(gen, params: Params, data_dir: Path, limit: int) -> tuple[list[str], str]:
    """Give a text DiT's generator the first `limit` prompts of the prompt set: (prompts, where they come from)."""
    prompts, source = prompt_set(params, data_dir, limit)
    hidden, mask, digest = encode_prompts(params, prompts, gen.device, gen.config)
    gen.set_prompts(hidden, mask, digest)
    return prompts, source


def folder_reference(params: Params, extractor, count: int) -> dict:
    """Features and statistics of the first `count` images of `text.prompt_images` (one per prompt), read and
    extracted a batch at a time."""
    from aligntok.data.prompts import prompt_images, reference_image
    from aligntok.eval.features import extract
    from aligntok.eval.metrics import feature_stats
    if params.text.prompts:  # the prompt set may be shorter than eval.num_samples
        from aligntok.data.prompts import read_prompts
        count = min(count, len(read_prompts(params.text.prompts)))
    files, feats = prompt_images(params.text.prompt_images, count), []
    for start in range(0, len(files), params.eval.batch_size):
        batch = np.stack([np.asarray(reference_image(f, params.data.resolution))
                          for f in files[start:start + params.eval.batch_size]])
        feats.append(extract(extractor, batch, batch_size=params.eval.batch_size)[0])
    feats = np.concatenate(feats)
    mu, sigma = feature_stats(feats)
    return {"mu": mu, "sigma": sigma, "features": feats, "name": str(params.text.prompt_images), "count": len(feats),
            "stats": "prompt-images"}


def prompt_reference(params: Params, data_dir: Path, extractor, coord, cache_dir: Path,
                     count: int) -> dict | None:
    """The prompt set's images as the FD/FID reference (on rank 0; None elsewhere)."""
    from aligntok.data.dataset import loader_workers
    from aligntok.eval.reference import train_reference
    if params.text.prompt_images:
        return folder_reference(params, extractor, count) if coord.is_main else None
    workers = loader_workers(params.data.num_workers, params.launcher.nproc_per_node)
    return train_reference(extractor, coord, data_dir, cache_dir, f"{params.data.name}-val",
                           batch_size=params.eval.batch_size, num_workers=workers, split="val")


def caption_judged(judge, images_nhwc: np.ndarray, prompt_ids: np.ndarray, prompts: list[str]) -> dict:
    """`caption_acc_judge` and `attr_acc_<attribute>_judge` of samples against their prompts."""
    from aligntok.eval.caption_judge import caption_scores
    from aligntok.eval.features import nhwc_to_nchw
    scores = caption_scores(judge, nhwc_to_nchw(images_nhwc), [prompts[int(i)] for i in prompt_ids])
    return {f"{k}_judge": float(v) for k, v in scores.items()}


def chance_levels() -> dict:
    """What a uniform random guess scores on the scenes' prompts: `<metric>_chance`, printed beside each score."""
    from aligntok.data.scenes import chance_levels as levels
    return {f"{k}_chance": float(v) for k, v in levels().items()}
