"""gpu-check's DDP row: `aligntok bench ddp`'s worker (the DiT step under DDP exactly as training wraps it) launched by
torchrun on one GPU and on every visible GPU at the same batch per GPU (NCCL; gloo processes in a --cpu-dry-run),
each rank also reporting its peak memory. A launch that does not finish in time is killed with its workers."""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # holds the aligntok package: the workers import it from here


def _launch(nproc: int, model: str, global_batch: int, steps: int, tmp: Path, timeout_s: float) -> dict:
    out = tmp / f"ddp-{nproc}.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "aligntok.bench.gpu_ddp", "--worker", "--model", model, "--global-batch", str(global_batch),
           "--steps", str(steps), "--out", str(out), "--shared", str(tmp / "shared")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a timeout kills torchrun and its ranks
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"{nproc} process(es) did not finish in {timeout_s:.0f} s (killed)") from None
    if proc.returncode:
        last = err.strip().splitlines()[-1] if err.strip() else "no output"
        raise RuntimeError(f"{nproc} process(es) failed (exit {proc.returncode}): {last}")
    r = json.loads(out.read_text())
    peaks = [json.loads(p.read_text()) for p in sorted(tmp.glob(f"{out.name}.rank*.peak"))]
    med = statistics.median(r["s_per_step"])
    return {"processes": r["world_size"], "device": r["device"], "global_batch": global_batch,
            "s_per_step": med, "img_per_s": global_batch / med,
            "peak_gib": max(peaks) / 2 ** 30 if peaks and None not in peaks else None}


def ddp_row(model: str, per_process: int, steps: int, nproc: int, timeout_s: float) -> dict:
    """1 process, then `nproc`, at `per_process` images each; the row is the `nproc` run (peak: its largest rank's),
    its efficiency the speed-up over `nproc` (1.0 = perfect weak scaling)."""
    with tempfile.TemporaryDirectory(prefix="aligntok-gpu-check-ddp-") as d:
        one = _launch(1, model, per_process, steps, Path(d), timeout_s)
        many = _launch(nproc, model, per_process * nproc, steps, Path(d), timeout_s)
    efficiency = many["img_per_s"] / (nproc * one["img_per_s"])
    backend = "NCCL" if many["device"] == "cuda" else "gloo"
    return {"img_per_s": many["img_per_s"], "s_per_step": many["s_per_step"], "timed_steps": steps,
            "peak_gib": many["peak_gib"], "one_process": one, "efficiency": efficiency,
            "note": (f"{backend}, {nproc} x {per_process} images: {efficiency:.2f} of {nproc} x the one-process "
                     f"{one['img_per_s']:.1f} img/s")}


def _worker(argv: list[str]) -> None:
    from aligntok.bench.ddp import _worker as ddp_step_worker

    ddp_step_worker(argv)
    out = argv[argv.index("--out") + 1]
    # the rank's own device: init_distributed made it current (one process: cuda:0)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    Path(f"{out}.rank{os.environ.get('RANK', '0')}.peak").write_text(json.dumps(peak))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:  # what _launch starts under torchrun
    _worker(sys.argv[2:])
