"""LightningDiT train-step and sampling throughput on 16x16x32 latents, achieved FLOP/s vs a GEMM peak."""
from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from aligntok.diffusion.flow import FlowMatching
from aligntok.models.dit import build_dit


def attention_backend() -> str:
    if torch.cuda.is_available():
        b = torch.backends.cuda
        on = [n for n, f in (("flash", b.flash_sdp_enabled), ("mem_efficient", b.mem_efficient_sdp_enabled),
                             ("math", b.math_sdp_enabled)) if f()]
        return "cuda sdpa: " + ",".join(on)
    return "cpu sdpa (torch's fused CPU flash-attention kernel for float32)"


def _timed(fn, steps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def measure(name: str, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = build_dit(name, input_size=16, in_channels=32, num_classes=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fm = FlowMatching()
    x, y = torch.randn(batch, 32, 16, 16), torch.randint(0, 1000, (batch,))

    def train_step():
        loss, _ = fm.loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    counter = FlopCounterMode(display=False)
    with counter:
        train_step()
    train_flops = counter.get_total_flops()
    train_s = _timed(train_step, steps)
    model.eval()
    t = torch.rand(batch)

    def forward():
        with torch.no_grad():
            model(x, t, y)

    fwd_s = _timed(forward, steps)
    return {"model": name, "batch": batch, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "train_img_per_s": batch / train_s, "train_flop_per_step": train_flops,
            "train_achieved_flop_s": train_flops / train_s,
            "sample_img_per_s_per_step": batch / fwd_s,
            "sample_img_per_s_30_euler_steps": batch / (30 * fwd_s),
            "sample_img_per_s_250_euler_steps": batch / (250 * fwd_s)}


def run(quick: bool = False, batch_sizes=(2, 4, 8), models=("tiny", "LightningDiT-XL/1")) -> dict:
    from aligntok.stages.bench import gemm_peak_flops

    peak = gemm_peak_flops()
    if quick:
        batch_sizes, models = (2,), ("tiny",)
    rows = [measure(m, b, 2 if "XL" in m else 5) for m in models for b in batch_sizes]
    for r in rows:
        r["fraction_of_gemm_peak"] = r["train_achieved_flop_s"] / peak
    return {"gemm_peak_flop_s": peak, "attention_backend": attention_backend(), "threads": torch.get_num_threads(),
            "rows": rows}
