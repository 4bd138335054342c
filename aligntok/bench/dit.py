"""LightningDiT throughput on 16x16x32 latents: train step (forward + backward + AdamW) and sampling (one Euler
step, and a 30-step sampler derived from it), with FLOPs from FlopCounterMode and achieved FLOP/s against a
float32 GEMM peak measured in the same run, plus the SDPA kernel the attention actually dispatched to."""
from __future__ import annotations

import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from aligntok.diffusion.flow import FlowMatching
from aligntok.diffusion.sampler import sample
from aligntok.models.dit import build_dit
from aligntok.stages.bench import gemm_peak_flops
from aligntok.train.loop import adamw, cuda_fast_math

LATENT = (32, 16, 16)
NUM_CLASSES = 1000
SAMPLER_STEPS = 30


class _SdpaKernels(TorchDispatchMode):
    """Records the aten attention kernels that F.scaled_dot_product_attention dispatches to."""
    def __init__(self):
        super().__init__()
        self.kernels: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if "attention" in name:
            self.kernels.add(name)
        return func(*args, **(kwargs or {}))


def attention_backend(device: torch.device) -> dict:
    """The enabled SDPA backends, and the kernel one DiT-shaped float32 attention call used here."""
    q = torch.randn(2, 16, 256, 72, device=device)
    with _SdpaKernels() as rec, torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    used = sorted(rec.kernels)
    if device.type == "cuda":
        b = torch.backends.cuda
        enabled = [n for n, f in (("flash", b.flash_sdp_enabled), ("mem_efficient", b.mem_efficient_sdp_enabled),
                                  ("cudnn", b.cudnn_sdp_enabled), ("math", b.math_sdp_enabled)) if f()]
        return {"device": "cuda", "enabled": enabled, "kernel_used": used}
    return {"device": "cpu", "enabled": ["cpu flash (fused) / math fallback"], "kernel_used": used,
            "note": "CPU run: the CUDA flash / mem-efficient backends do not apply"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, steps: int, device: torch.device) -> float:
    """Mean seconds per call over `steps` calls (the caller has already warmed fn up)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def measure(name: str, batch: int, steps: int, device: torch.device, variants: tuple[str, ...] = ()) -> dict:
    """One row; `variants` ("grad_checkpointing", "compile") also time the train step with that option on."""
    torch.manual_seed(0)
    model = build_dit(name, input_size=LATENT[1], in_channels=LATENT[0], num_classes=NUM_CLASSES).to(device)
    opt = adamw(model.parameters(), device, lr=1e-4)
    fm = FlowMatching()
    x = torch.randn(batch, *LATENT, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def train_step():
        loss, _ = fm.loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train_flops = _flops(train_step)  # doubles as the warm-up (AdamW state allocated here)
    train_s = _time(train_step, steps, device)
    options = {}
    for key, flag in (("grad_checkpointing", "grad_checkpointing"), ("compile", "compiled")):
        if key in variants:  # same FLOPs counted once (eager); the first step (and its compile) is untimed
            setattr(model, flag, True)
            t0 = time.perf_counter()
            train_step()
            options[f"train_s_per_step_{key}"] = _time(train_step, steps, device)
            options[f"first_step_s_{key}"] = time.perf_counter() - t0 - steps * options[f"train_s_per_step_{key}"]
            setattr(model, flag, False)
    del opt
    model.eval()

    def euler_step():
        sample(model, x, y, steps=1, method="euler")

    step_flops = _flops(euler_step)
    step_s = _time(euler_step, steps, device)
    return {"model": name, "batch": batch, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "train_s_per_step": train_s, "train_img_per_s": batch / train_s,
            "train_flop_per_step": train_flops, "train_achieved_flop_s": train_flops / train_s,
            "sample_s_per_euler_step": step_s, "sample_img_per_s_one_step": batch / step_s,
            f"sample_img_per_s_{SAMPLER_STEPS}_euler_steps": batch / (SAMPLER_STEPS * step_s),
            "sample_flop_per_step": step_flops, "sample_achieved_flop_s": step_flops / step_s, **options}


def run(batch_sizes=(2, 4, 8), models=("tiny", "LightningDiT-XL/1"), steps: int = 3, quick: bool = False,
        device: str | torch.device | None = None) -> dict:
    """Timed steps per row: `steps` (XL-sized models: at most 2). quick: tiny at batch 2 only.

    The tiny rows also time the train step with dit.grad_checkpointing and (not with quick: on a CPU the compile
    alone takes about a minute, reported as first_step_s_compile) with dit.compile's steady-state step."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda_fast_math(dev)
    if quick:
        batch_sizes, models = (2,), ("tiny",)
    peak = gemm_peak_flops(dev)
    rows = []
    for name in models:
        for b in batch_sizes:
            variants = () if name != "tiny" else ("grad_checkpointing",) if quick else ("grad_checkpointing", "compile")
            r = measure(name, b, min(steps, 2) if "XL" in name else steps, dev, variants)
            r["train_fraction_of_gemm_peak"] = r["train_achieved_flop_s"] / peak
            r["sample_fraction_of_gemm_peak"] = r["sample_achieved_flop_s"] / peak
            rows.append(r)
    return {"device": str(dev), "threads": torch.get_num_threads(), "latent_shape": list(LATENT),
            "gemm_peak_flop_s": peak, "attention_backend": attention_backend(dev), "rows": rows}
