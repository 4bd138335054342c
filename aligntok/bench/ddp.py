"""`aligntok bench ddp`: how a DiT train step scales from one process to N.

Each configuration is a real torchrun launch (gloo on CPU, NCCL on GPUs) of this module's worker: DDP exactly as
training wraps it (gradient bucket views), AdamW, the flow-matching loss; a barrier around every timed step, so
the figure is the slowest rank's. On a CPU the cores are shared and the global batch stays the same: one process
with every core is the baseline, N processes get cores/N threads each, and one process with cores/N threads is
timed too, so the cost of DDP itself (the gradient all-reduce) shows apart from the split of the cores. On GPUs:
1 GPU against all visible GPUs, one process per GPU, at the same batch per GPU.

speedup = images/s of N processes over images/s of the one-process baseline. About 1.0x or below on a CPU is
expected when one process already keeps every core busy: DDP only splits the same GEMM work."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _worker(argv: list[str]) -> None:
    import torch.distributed as torch_dist

    from aligntok.bench.dit import LATENT, NUM_CLASSES
    from aligntok.diffusion.flow import FlowMatching
    from aligntok.models.dit import build_dit
    from aligntok.train.dist import cleanup, init_distributed
    from aligntok.train.loop import adamw, bf16_autocast, cuda_fast_math, ddp_wrap

    p = argparse.ArgumentParser()
    p.add_argument("--model"), p.add_argument("--global-batch", type=int), p.add_argument("--steps", type=int)
    p.add_argument("--out"), p.add_argument("--shared")
    a = p.parse_args(argv)
    dist = init_distributed("auto", shared_dir=a.shared)
    cuda_fast_math(dist.device)
    torch.manual_seed(0)  # same weights on every rank, as DDP's broadcast would make them anyway
    model = build_dit(a.model, input_size=LATENT[1], in_channels=LATENT[0], num_classes=NUM_CLASSES).to(dist.device)
    if dist.world_size > 1:
        model = ddp_wrap(model, dist.device)
    opt, fm = adamw(model.parameters(), dist.device, lr=1e-4), FlowMatching()
    local = a.global_batch // dist.world_size
    g = torch.Generator().manual_seed(1 + dist.rank)
    x = torch.randn(local, *LATENT, generator=g).to(dist.device)
    y = torch.randint(0, NUM_CLASSES, (local,), generator=g).to(dist.device)

    def sync():
        if dist.device.type == "cuda":
            torch.cuda.synchronize(dist.device)
        if dist.world_size > 1:
            torch_dist.barrier()

    times = []
    for i in range(a.steps + 1):  # step 0: warm-up (allocation, DDP's first bucket rebuild), not timed
        sync()
        t0 = time.perf_counter()
        with bf16_autocast(dist.device):  # as training runs on CUDA (TF32 too); nothing changes on CPU
            loss, _ = fm.loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if i:
            times.append(time.perf_counter() - t0)
    if dist.is_main:
        Path(a.out).write_text(json.dumps({"world_size": dist.world_size, "threads": torch.get_num_threads(),
                                           "device": dist.device.type, "s_per_step": times}))
    cleanup()


def _launch(nproc: int, threads: int | None, model: str, global_batch: int, steps: int, tmp: Path) -> dict:
    out = tmp / f"p{nproc}-t{threads}.json"
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "aligntok.bench.ddp", "--worker", "--model", model, "--global-batch", str(global_batch),
           "--steps", str(steps), "--out", str(out), "--shared", str(tmp / "shared")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"bench ddp: {nproc} process(es) failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no output'}")
    r = json.loads(out.read_text())
    med = statistics.median(r["s_per_step"])
    return {"processes": r["world_size"], "threads_per_process": r["threads"], "device": r["device"],
            "global_batch": global_batch, "s_per_step": r["s_per_step"], "s_per_step_median": med,
            "img_per_s": global_batch / med}


def run(quick: bool = False, model: str | None = None, batch: int | None = None, steps: int = 5) -> dict:
    """CPU: 1 -> 2 processes at the same global batch (`batch`, default 8). GPUs: 1 -> every visible GPU at the
    same batch per GPU (`batch`, default 32), so the one-GPU run fits in memory wherever the N-GPU one does; the
    efficiency is the speed-up over N. quick: the tiny model, 2 steps (a smoke test of the benchmark itself)."""
    gpus = torch.cuda.device_count()
    if gpus == 1:
        why = "one GPU is visible: there is nothing to split (set CUDA_VISIBLE_DEVICES to 2 or more GPUs)"
        print(f"bench ddp: skipped: {why}", file=sys.stderr)
        return {"skipped": why}
    n, cores = gpus or 2, os.cpu_count() or 1
    model = model or ("tiny" if quick else "LightningDiT-XL/1" if gpus else "LightningDiT-B/2")
    steps = 2 if quick else steps
    if gpus:  # one GPU, then n: weak scaling
        per_gpu = batch or 32
        layout = [(1, None, per_gpu), (n, None, per_gpu * n)]
    else:  # the cores are shared: the baseline on every core, one process on one process's share, n processes
        batch, share = batch or 8, max(1, cores // n)
        if batch % n:
            raise ValueError(f"bench ddp: global batch {batch} does not divide over {n} processes")
        layout = [(1, cores, batch), (1, share, batch), (n, share, batch)]
    with tempfile.TemporaryDirectory(prefix="aligntok-bench-ddp-") as d:
        rows = [_launch(p, threads, model, b, steps, Path(d)) for p, threads, b in layout]
    base, last = rows[0], rows[-1]
    speedup = last["img_per_s"] / base["img_per_s"]
    result = {"model": model, "timed_steps": steps, "cores": cores, "gpus": gpus, "rows": rows, "speedup": speedup,
              "scaling": "same batch per GPU" if gpus else "same global batch"}
    if gpus:
        result["efficiency"] = speedup / n
    else:
        result["speedup_over_one_process_on_its_share"] = last["img_per_s"] / rows[1]["img_per_s"]
    print(f"bench ddp: {model}, {result['scaling']}: 1 -> {n} processes = {speedup:.2f}x "
          f"({base['img_per_s']:.2f} -> {last['img_per_s']:.2f} img/s)", file=sys.stderr)
    return result


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:  # what _launch starts under torchrun
    _worker(sys.argv[2:])
