"""The independent judge: a small CNN classifier trained on held-out synthetic images.

It answers two questions about generated images without using anything the tokenizer or the DiT saw:
- class accuracy of conditional samples (does a sample of class c look like class c?);
- a Frechet distance in the judge's own 128-d penultimate feature space (`fd_judge`), against the judge's held-out
  reference images, a backbone that is not the tokenizer's encoder and not the FID backbone;
- precision/recall (k=3, as for the FID backbone) in that same space against the same reference images. On the
  synthetic data the ImageNet FID backbone's space separates any smoothed image from the noisy originals
  (reconstructions of val images at 20 dB PSNR score precision 0 there), so this is the space where P/R of a small
  CPU run say something.

Held out: the judge's images are drawn with their own seed word (`judge_seed`), so no image of the prepared data
set, and none of the tokenizer's or DiT's training images, is among them. Training is seeded and deterministic on
CPU. Only the synthetic source has a judge (`judge.source: synthetic`); on real data (the paper profile) the
Inception backbone does this job and the judge stage records that it is off.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CONFIG_FILE, WEIGHTS_FILE, STATS_FILE = "config.json", "model.safetensors", "reference.npz"
FEATURE_DIM = 128


class JudgeLoadError(ValueError):
    """The judge stage's output folder is missing or incomplete (one line naming the file)."""


def judge_seed(seed: int) -> int:
    """A seed word no data set of the DAG uses (prepare draws synthetic image i from the word [seed, i])."""
    return 1_000_003 + seed


class JudgeNet(nn.Module):
    """uint8 N x 3 x H x W -> (features N x 128, logits N x classes). Input resized to `resolution`."""

    def __init__(self, num_classes: int, resolution: int):
        super().__init__()
        self.num_classes, self.resolution = num_classes, resolution
        widths = (32, 64, 128, FEATURE_DIM)
        layers, cin = [], 3
        for w in widths:  # every conv halves the grid: 64 px -> 4x4 before pooling (cheap on a CPU)
            layers += [nn.Conv2d(cin, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.SiLU()]
            cin = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float() / 127.5 - 1
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                              align_corners=False)
        features = self.body(x).mean(dim=(2, 3))
        return features, self.head(features)


def synthetic_batch(indices, num_classes: int, resolution: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from aligntok.data.synthetic import synthetic_image
    labels = [i % num_classes for i in indices]
    images = np.stack([np.asarray(synthetic_image(i, c, resolution, judge_seed(seed)))
                       for i, c in zip(indices, labels)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


@torch.no_grad()
def judge_outputs(judge: JudgeNet, images: torch.Tensor, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(features float64, logits float64) of N x 3 x H x W uint8 images, in eval mode."""
    judge.eval()
    feats, logits = [], []
    for start in range(0, len(images), batch_size):
        f, lg = judge(images[start:start + batch_size])
        feats.append(f.double().numpy())
        logits.append(lg.double().numpy())
    return np.concatenate(feats), np.concatenate(logits)


def train_judge(num_classes: int, resolution: int, seed: int, train_images: int, test_images: int,
                steps: int, batch_size: int, lr: float) -> tuple[JudgeNet, dict]:
    """Train on `train_images` held-out images, report accuracy on `test_images` others. Returns (judge, facts)."""
    torch.manual_seed(seed)
    x, y = synthetic_batch(range(train_images), num_classes, resolution, seed)
    x_test, y_test = synthetic_batch(range(train_images, train_images + test_images), num_classes, resolution, seed)
    judge = JudgeNet(num_classes, resolution)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    judge.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        batch = x[idx]
        flip = torch.rand(batch_size, generator=gen) < 0.5  # the DiT's data are flip-augmented too
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        lr_now = lr * 0.5 * (1 + np.cos(np.pi * step / steps))  # cosine to zero: a stable final model
        for g in opt.param_groups:
            g["lr"] = lr_now
        loss = F.cross_entropy(judge(batch)[1], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    feats, logits = judge_outputs(judge, x_test)
    accuracy = float((logits.argmax(1) == y_test.numpy()).mean())
    facts = {"heldout_accuracy": accuracy, "chance": 1.0 / num_classes, "final_loss": float(loss.detach()),
             "train_images": train_images, "test_images": test_images}
    return judge, facts | {"reference": feats}


def save_judge(judge: JudgeNet, reference_features: np.ndarray, directory: Path, facts: dict) -> None:
    from safetensors.torch import save_file

    from aligntok.eval.metrics import feature_stats
    from aligntok.io import write_json_atomic
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(directory / WEIGHTS_FILE))
    mu, sigma = feature_stats(reference_features)
    np.savez(directory / STATS_FILE, mu=mu, sigma=sigma, features=reference_features)
    write_json_atomic(directory / CONFIG_FILE, {"num_classes": judge.num_classes, "resolution": judge.resolution,
                                                **facts})


def load_judge(directory: Path) -> tuple[JudgeNet, dict[str, np.ndarray]] | None:
    """(judge, its reference: mu, sigma and the held-out features), or None when the judge stage recorded that it
    is off."""
    from safetensors.torch import load_file

    def present(path: Path) -> Path:
        if not path.is_file():
            raise JudgeLoadError(f"{path}: missing; run `aligntok judge` first (dvc repro runs it before train-dit "
                                 f"and evaluate), or set judge.source=none")
        return path
    config = json.loads(present(directory / CONFIG_FILE).read_text())
    if not config.get("enabled", True):
        return None
    judge = JudgeNet(config["num_classes"], config["resolution"])
    judge.load_state_dict(load_file(str(present(directory / WEIGHTS_FILE))))
    with np.load(present(directory / STATS_FILE), allow_pickle=False) as z:
        return judge.eval(), {k: z[k] for k in ("mu", "sigma", "features")}


def judge_metrics(loaded: tuple | None, images: torch.Tensor, labels: np.ndarray | None) -> dict:
    """fd_judge and precision/recall against the judge's held-out images, and class accuracy when the samples are
    conditional. `loaded` is what `load_judge` returned (None: the judge is off, no scores)."""
    from aligntok.eval.metrics import feature_stats, frechet_distance, precision_recall
    if loaded is None:
        return {}
    judge, ref = loaded
    feats, logits = judge_outputs(judge, images)
    out = {"fd_judge": frechet_distance(*feature_stats(feats), ref["mu"], ref["sigma"])}
    out["precision_judge"], out["recall_judge"] = precision_recall(ref["features"], feats)
    if labels is not None:
        out["class_acc_judge"] = float((logits.argmax(1) == np.asarray(labels)).mean())
    return out
