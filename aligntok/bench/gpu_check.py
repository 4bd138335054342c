"""`make gpu-check`: one prepared GPU measurement (a few minutes on an H200) of what issue 11's options buy.

LightningDiT-XL/1 train img/s and peak memory per GPU at several batches, with and without `dit.compile` and
`dit.grad_checkpointing` (bf16 autocast, TF32, fused AdamW: what `aligntok train-dit` runs on CUDA), sampling
img/s of the 30-step Euler sampler, and tokenizer stage-2 (GAN on) img/s at 256 px. Prints a table and writes
JSON. It exists so a GPU session spends its few minutes measuring, not writing code; without CUDA it says so in
one line and exits 0 (nothing here is meaningful on a CPU), and with GPUs that torch cannot use (a CUDA build newer
than the driver) it says so in one line and exits 1.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from aligntok.bench.dit import LATENT, NUM_CLASSES, SAMPLER_STEPS
from aligntok.launch import GpuUnavailable, check_cuda_visible
from aligntok.train.loop import adamw, bf16_autocast, cuda_fast_math

OPTIONS = [(False, False), (True, False), (False, True), (True, True)]  # (compile, grad_checkpointing)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="LightningDiT-XL/1")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128], help="per-GPU train batches")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row (compiles happen here)")
    p.add_argument("--sample-batch", type=int, default=128)
    p.add_argument("--tokenizer-batch", type=int, default=16)
    p.add_argument("--skip-compile", action="store_true", help="eager rows only (no compile time)")
    p.add_argument("--skip-tokenizer", action="store_true")
    p.add_argument("--out", default="outputs/gpu_check.json")
    return p.parse_args(argv)


def _timed(fn, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds per call, peak GiB allocated) over `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, torch.cuda.max_memory_allocated() / 2 ** 30


def train_rows(args, device: torch.device) -> list[dict]:
    from aligntok.diffusion.flow import FlowMatching
    from aligntok.models.dit import build_dit

    torch.manual_seed(0)
    model = build_dit(args.model, input_size=LATENT[1], in_channels=LATENT[0], num_classes=NUM_CLASSES).to(device)
    opt, fm, rows = adamw(model.parameters(), device, lr=1e-4), FlowMatching(), []
    for compiled, remat in [o for o in OPTIONS if not (args.skip_compile and o[0])]:
        model.compiled, model.grad_checkpointing = compiled, remat  # compile_blocks() only sets this flag
        for b in args.batches:
            x = torch.randn(b, *LATENT, device=device)
            y = torch.randint(0, NUM_CLASSES, (b,), device=device)

            def step():
                with bf16_autocast(device):
                    loss, _ = fm.loss(model, x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            row = {"part": "train", "model": args.model, "batch": b, "compile": compiled, "grad_checkpointing": remat}
            try:
                sec, peak = _timed(step, args.warmup, args.steps)
                row.update(img_per_s=b / sec, s_per_step=sec, peak_gib=peak)
            except torch.OutOfMemoryError:
                row.update(img_per_s=None, s_per_step=None, peak_gib="OOM")
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            rows.append(row)
            print(_line(row), flush=True)
    model.compiled, model.grad_checkpointing = False, False
    model.eval()
    rows.append(_sample_row(model, args, device))
    return rows


def _sample_row(model, args, device) -> dict:
    from aligntok.diffusion.sampler import sample

    b = args.sample_batch
    x = torch.randn(b, *LATENT, device=device)
    y = torch.randint(0, NUM_CLASSES, (b,), device=device)

    def euler_step():
        with torch.no_grad(), bf16_autocast(device):
            sample(model, x, y, steps=1, method="euler")
    sec, peak = _timed(euler_step, args.warmup, args.steps)
    row = {"part": f"sample ({SAMPLER_STEPS} Euler steps, no CFG)", "model": args.model, "batch": b,
           "img_per_s": b / (SAMPLER_STEPS * sec), "s_per_step": sec, "peak_gib": peak}
    print(_line(row), flush=True)
    return row


def tokenizer_row(args, device: torch.device) -> dict:
    from aligntok.bench.tokenizer import CONFIGS, _recipe, _step

    torch.manual_seed(0)
    with torch.device(device):  # built on the GPU, so the recipe's AdamW is the fused one
        recipe = _recipe(CONFIGS["dinov2-B@256"], stage=2)
    b = args.tokenizer_batch
    x, y = torch.rand(b, 3, 256, 256, device=device) * 2 - 1, torch.zeros(b, dtype=torch.long, device=device)

    def step():
        with bf16_autocast(device):
            _step(recipe, x, y)
    sec, peak = _timed(step, args.warmup, args.steps)
    row = {"part": "tokenizer stage 2 (GAN on)", "model": "dinov2-B@256", "batch": b, "img_per_s": b / sec,
           "s_per_step": sec, "peak_gib": peak}
    print(_line(row), flush=True)
    return row


def _line(r: dict) -> str:
    opts = f"compile={r['compile']!s:5} ckpt={r['grad_checkpointing']!s:5}" if "compile" in r else " " * 24
    ips = f"{r['img_per_s']:9.1f}" if r.get("img_per_s") else "        -"
    peak = f"{r['peak_gib']:7.1f}" if isinstance(r.get("peak_gib"), float) else f"{r.get('peak_gib', '-')!s:>7}"
    return f"{r['part'][:34]:34} {r['model']:18} b={r['batch']:<4} {opts} img/s {ips}  peak GiB {peak}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_cuda_visible()
    except GpuUnavailable as e:
        print(f"gpu-check: {e}")
        return 1
    if not torch.cuda.is_available():
        print("gpu-check: needs a CUDA GPU and none is visible here; nothing measured")
        return 0
    device = torch.device("cuda", 0)
    cuda_fast_math(device)
    rows = train_rows(args, device)
    if not args.skip_tokenizer:
        rows.append(tokenizer_row(args, device))
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "args": vars(args),
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"gpu-check: {len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
