"""The caption judge: does a generated scene show what its prompt says?

A small CNN trunk with one linear head per scene attribute (aligntok/data/scenes.py: shape, colour, background,
count, position), trained on held-out scenes drawn with the judge's own seed word (`judge_seed`), so no scene of
the prepared data set is among them. `caption_scores` parses each prompt, predicts every attribute of its image and
reports the fraction of images whose whole caption is right (`caption_acc`) and each attribute's accuracy; chance
is `chance_levels()` since prompts are uniform over the vocabulary.

Unlike the class judge (eval/judge.py), the trunk's last grid is flattened, not averaged: position is an attribute,
and a spatial mean would throw away where the object is. There is no flip augmentation either: it swaps left and
right. Training is seeded and deterministic on CPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aligntok.data.scenes import ATTRIBUTES, chance_levels, draw_scene, parse_caption
from aligntok.eval.judge import JudgeLoadError, judge_seed

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
FEATURE_DIM, GRID = 128, 4


class CaptionJudgeNet(nn.Module):
    """uint8 N x 3 x H x W -> {attribute: logits N x values}. Input resized to `resolution`."""

    def __init__(self, resolution: int):
        super().__init__()
        self.resolution = resolution
        layers, cin = [], 3
        for w in (16, 32, 64, FEATURE_DIM):  # every conv halves the grid: 64 px -> 4x4
            layers += [nn.Conv2d(cin, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.SiLU()]
            cin = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(GRID), nn.Flatten(),
                                  nn.Linear(FEATURE_DIM * GRID * GRID, FEATURE_DIM), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURE_DIM, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float() / 127.5 - 1
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                              align_corners=False)
        features = self.body(x)
        return {name: head(features) for name, head in self.heads.items()}


def scene_batch(indices, resolution: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 N x 3 x H x W images, N x attributes value indices) of scenes drawn with the judge's seed word."""
    images, targets = [], []
    for i in indices:
        image, caption = draw_scene(i, resolution, judge_seed(seed))
        images.append(np.asarray(image))
        targets.append(_targets(caption))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(targets)


def _targets(prompt: str) -> list[int]:
    attrs = parse_caption(prompt)
    return [values.index(attrs[name]) for name, values in ATTRIBUTES.items()]


@torch.no_grad()
def _predict(judge: CaptionJudgeNet, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """N x attributes predicted value indices, in eval mode."""
    judge.eval()
    out = []
    for start in range(0, len(images), batch_size):
        logits = judge(images[start:start + batch_size])
        out.append(torch.stack([logits[name].argmax(1) for name in ATTRIBUTES], dim=1))
    return torch.cat(out) if out else torch.zeros(0, len(ATTRIBUTES), dtype=torch.long)


def _scores(predicted: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    right = (predicted == targets).double()
    out = {"caption_acc": float(right.prod(dim=1).mean())}
    out |= {f"attr_acc_{name}": float(right[:, k].mean()) for k, name in enumerate(ATTRIBUTES)}
    return out


def train_caption_judge(resolution: int, seed: int, train_images: int, test_images: int, steps: int,
                        batch_size: int, lr: float) -> tuple[CaptionJudgeNet, dict]:
    """Train on `train_images` held-out scenes, score `test_images` others. Returns (judge, facts)."""
    torch.manual_seed(seed)
    x, y = scene_batch(range(train_images), resolution, seed)
    x_test, y_test = scene_batch(range(train_images, train_images + test_images), resolution, seed)
    judge = CaptionJudgeNet(resolution)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    judge.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        for g in opt.param_groups:  # cosine to zero: a stable final model
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        logits = judge(x[idx])
        loss = sum(F.cross_entropy(logits[name], y[idx, k]) for k, name in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    heldout = _scores(_predict(judge, x_test), y_test)
    facts = {f"heldout_{k}": v for k, v in heldout.items()}
    facts |= {f"chance_{k}": v for k, v in chance_levels().items()}
    facts |= {"final_loss": float(loss.detach()), "train_images": train_images, "test_images": test_images}
    return judge, facts


def save_caption_judge(judge: CaptionJudgeNet, folder: Path, facts: dict) -> None:
    from safetensors.torch import save_file

    from aligntok.io import write_json_atomic
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(folder / WEIGHTS_FILE))
    write_json_atomic(folder / CONFIG_FILE, {"resolution": judge.resolution,
                                             "attributes": {k: list(v) for k, v in ATTRIBUTES.items()}, **facts})


def load_caption_judge(folder: Path) -> CaptionJudgeNet | None:
    """The saved judge in eval mode, or None when the judge stage recorded that it is off (as `load_judge`). A
    missing file, or a judge trained on another vocabulary, is one line."""
    from safetensors.torch import load_file

    folder = Path(folder)

    def present(name: str) -> Path:
        if not (folder / name).is_file():
            raise JudgeLoadError(f"{folder / name}: missing; run `aligntok judge` first (it saves the caption "
                                 f"judge there), or set judge.source=none")
        return folder / name
    config = json.loads(present(CONFIG_FILE).read_text())
    if not config.get("enabled", True):
        return None
    present(WEIGHTS_FILE)
    vocabulary = {k: list(v) for k, v in ATTRIBUTES.items()}
    if config.get("attributes") != vocabulary:
        raise JudgeLoadError(f"{folder / CONFIG_FILE}: the judge was trained on the scene vocabulary "
                             f"{config.get('attributes')}, not today's {vocabulary}; train it again")
    judge = CaptionJudgeNet(config["resolution"])
    try:
        judge.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    except Exception as err:  # a truncated file, another model's weights: one line, not a traceback of torch's
        raise JudgeLoadError(f"{folder / WEIGHTS_FILE}: not a caption judge's weights "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err
    return judge.eval()


def predict_attributes(judge: CaptionJudgeNet, images_uint8: torch.Tensor) -> list[dict[str, str]]:
    """The attributes the judge sees in each of N x 3 x H x W uint8 images."""
    return [{name: ATTRIBUTES[name][int(v)] for name, v in zip(ATTRIBUTES, row)}
            for row in _predict(judge, images_uint8)]


def caption_scores(judge: CaptionJudgeNet | None, images_uint8: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """caption_acc (every attribute of the prompt right) and attr_acc_<attribute> of images against their prompts.
    Keys carry no suffix: the caller names the sampler (`_judge`, `_cfg`). No judge (switched off): no scores."""
    if judge is None:
        return {}
    if len(prompts) != len(images_uint8) or not prompts:
        raise ValueError(f"caption_scores: {len(images_uint8)} images and {len(prompts)} prompts; "
                         f"expected as many of each, at least one")
    targets = torch.tensor([_targets(p) for p in prompts], dtype=torch.long).reshape(-1, len(ATTRIBUTES))
    return _scores(_predict(judge, images_uint8), targets)
