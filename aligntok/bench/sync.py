"""`aligntok bench sync`: device->host synchronisations per training step, for the DiT and the tokenizer recipes.

Reading a CUDA tensor on the host (`.item()`, `float()`, `int()`, `bool()` as in `if t:`, `.tolist()`, `.cpu()`,
formatting) waits for every kernel queued before it: the GPU runs dry while Python catches up. The count comes from
the real training loop (`aligntok.train.loop.train`) running the real recipes on the ci profile's models:

- everywhere: the calls to those tensor methods made by the project's own code (files under `aligntok/`); each
  is a sync on CUDA. Calls from inside torch are left out: on a CPU, AdamW reads its step counters with `.item()`,
  which the fused CUDA AdamW never does.
- on CUDA also `cuda_reported`: what `torch.cuda.set_sync_debug_mode` reports, which sees syncs inside C++ ops and
  pageable host->device copies too.

Each sync is charged to the training step in progress (from one `recipe.losses` call to the next). Plain steps
are the ones that neither log, checkpoint nor preview; `per_plain_step` is their mean. The module runs on its own
(`python -m aligntok.bench.sync`), so that the same counting can run on an older checkout through PYTHONPATH.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch

import aligntok

SYNCING = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__", "__index__", "__format__")
PACKAGE = Path(aligntok.__file__).resolve().parent


class SyncCounter:
    """Counts, while active, the calls of the syncing tensor methods (SYNCING) made from code under `roots`
    (default: the aligntok package, this module excepted), each as (step, 'file:line'); `step` is whatever the
    caller last set. Restores torch.Tensor as it was on exit."""

    def __init__(self, roots: tuple[Path, ...] = (PACKAGE,)):
        self.roots = {str(Path(r).resolve()) + "/": Path(r).resolve().parent for r in roots}
        self.step: int | None = None
        self.events: list[tuple[int | None, str]] = []
        self.cuda_events: list[tuple[int | None, str]] = []
        self._saved: dict[str, object] = {}

    def _site(self, filename: str, lineno: int) -> str | None:
        """'dir/file.py:line' for a caller under one of the roots (not this module), else None."""
        if filename == __file__:
            return None
        root = next((r for r in self.roots if filename.startswith(r)), None)
        return None if root is None else f"{Path(filename).relative_to(self.roots[root])}:{lineno}"

    def _wrap(self, original):
        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            site = self._site(caller.f_code.co_filename, caller.f_lineno)
            if site is not None:
                self.events.append((self.step, site))
            return original(tensor, *args, **kwargs)
        return counted

    def _on_warning(self, message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" in str(message):
            self.cuda_events.append((self.step, f"{filename}:{lineno}"))

    def __enter__(self) -> "SyncCounter":
        for name in SYNCING:
            self._saved[name] = torch.Tensor.__dict__.get(name)
            setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name)))
        if torch.cuda.is_available():
            self._warnings = warnings.catch_warnings()
            self._warnings.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = self._on_warning
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(*exc)
        for name, original in self._saved.items():
            if original is None:
                delattr(torch.Tensor, name)  # it lives on torch._C.TensorBase
            else:
                setattr(torch.Tensor, name, original)


class Stepped:
    """A recipe that tells the counter which training step is in progress."""

    def __init__(self, recipe, counter: SyncCounter):
        self._recipe, self._counter = recipe, counter

    def __getattr__(self, name):
        return getattr(self._recipe, name)

    def losses(self, batch, step):
        self._counter.step = step
        return self._recipe.losses(batch, step)


def ci_params(overrides: list[str]):
    from aligntok.config import load_params
    return load_params(PACKAGE.parent / "profiles" / "ci.yaml", ["encoder.pretrained=none", *overrides],
                       check_paths=False)


def dit_case(steps: int, log_every: int, device: torch.device):
    """The DiT recipe as train-dit builds it (ci profile: LightningDiT tiny, clipping, EMA) on random latents."""
    from aligntok.models.dit import build_dit
    from aligntok.stages.dit import DitRecipe

    cfg = ci_params([f"dit.steps={steps}", f"dit.log_every={log_every}", "dit.batch_size=8",
                     "dit.probe_every=0"]).dit  # no judge here: a probe would only add a read of its own
    n, channels, size, classes = 32, 32, 2, 10
    model = build_dit(cfg.model, input_size=size, in_channels=channels, num_classes=classes).to(device)
    stats = {"mean": [0.0] * channels, "std": [1.0] * channels}
    data = torch.utils.data.TensorDataset(torch.randn(n, channels, size, size), torch.arange(n) % classes)
    return DitRecipe(model, cfg, stats), data, cfg, False


def tokenizer_case(steps: int, log_every: int, device: torch.device):
    """Stage 2 as tokenizer-stage2 builds it (ci profile): every part trains, the GAN is on from step 0, semantic
    preservation to a frozen stage-1 copy (with sp_grad_ratio on log steps), clipping, EMA; 32 px random images."""
    from aligntok.losses import ReconstructionLoss, build_lpips
    from aligntok.models.discriminator import PatchDiscriminator
    from aligntok.models.tokenizer import AlignTokenizer
    from aligntok.stages.tokenizer import TokenizerRecipe, tokenizer_config

    params = ci_params([f"tokenizer.stage2.steps={steps}", f"tokenizer.stage2.log_every={log_every}",
                        "tokenizer.stage2.batch_size=2"])
    cfg, res = params.tokenizer.stage2, params.data.resolution
    model = AlignTokenizer(tokenizer_config(params)).to(device)
    target = AlignTokenizer(tokenizer_config(params)).to(device).eval().requires_grad_(False)
    disc = PatchDiscriminator().to(device)
    loss_fn = ReconstructionLoss(build_lpips(params.lpips.net, params.lpips.pretrained_backbone).to(device),
                                 l1_weight=cfg.l1_weight, lpips_weight=cfg.lpips_weight, kl_weight=0.0,
                                 disc_weight=cfg.disc_weight, disc_start=cfg.disc_start, discriminator=disc)
    recipe = TokenizerRecipe(model, disc, loss_fn, cfg, 2, params.tokenizer.kind, target)
    data = torch.utils.data.TensorDataset(torch.rand(32, 3, res, res) * 2 - 1, torch.zeros(32, dtype=torch.long))
    return recipe, data, cfg, params.data.hflip


def count(case, steps: int, log_every: int, device: torch.device) -> dict:
    """Run `steps` training steps of `case` (checkpoint and preview only at the end) under a SyncCounter."""
    from aligntok.train.dist import DistInfo
    from aligntok.train.loop import train

    torch.manual_seed(0)
    recipe, data, cfg, hflip = case(steps, log_every, device)
    cfg = cfg.model_copy(update={"ckpt_every": 10 ** 6, "image_every": 10 ** 6})
    with tempfile.TemporaryDirectory() as tmp, SyncCounter() as counter:
        train(Stepped(recipe, counter), data, cfg, dist=DistInfo(0, 1, 0, device), ckpt_dir=Path(tmp),
              config_hash="bench", seed=0, hflip=hflip, desc="bench-sync")
    plain = [s for s in range(steps) if (s + 1) % log_every and s + 1 != steps]
    logged = [s for s in range(steps) if s not in plain]
    out = {"steps": steps, "log_every": log_every, "plain_steps": len(plain), "logged_steps": len(logged)}
    for key, events in (("", counter.events), ("cuda_reported_", counter.cuda_events)):
        if key and not torch.cuda.is_available():
            continue
        per_step = Counter(s for s, _ in events)
        out[f"{key}per_plain_step"] = sum(per_step[s] for s in plain) / len(plain)
        out[f"{key}max_plain_step"] = max(per_step[s] for s in plain)
        out[f"{key}per_logged_step"] = sum(per_step[s] for s in logged) / len(logged)
        out[f"{key}sites_plain"] = dict(sorted(Counter(site for s, site in events if s in plain).items()))
        out[f"{key}sites_logged"] = dict(sorted(Counter(site for s, site in events if s in logged).items()))
    return out


def run(quick: bool = False) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps, log_every = (4, 2) if quick else (12, 4)
    return {"device": str(device), "counting": "aligntok calls of " + ", ".join(SYNCING) + (
                "; cuda_reported_*: torch.cuda.set_sync_debug_mode" if device.type == "cuda" else ""),
            "dit": count(dit_case, steps, log_every, device),
            "tokenizer_stage2": count(tokenizer_case, steps, log_every, device)}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    print(json.dumps(run(quick=p.parse_args().quick), indent=2))
