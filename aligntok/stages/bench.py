"""`aligntok bench <target>`: throughput figures on this machine, printed as JSON (and saved with --out)."""
from __future__ import annotations

import importlib
import json
import platform

import torch

from aligntok.io import write_json_atomic


def gemm_peak_flops(device: torch.device | str = "cpu", n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an n x n float32 matmul on `device`: the yardstick for achieved FLOP/s."""
    import time
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def run_bench(target: str, out: str | None, quick: bool = False, reference_root: str | None = None) -> int:
    if reference_root is not None and target != "dit":
        print(f"aligntok bench {target}: --reference-root applies to `bench dit` only")
        return 2
    from aligntok.launch import GpuUnavailable, check_cuda_visible
    try:
        check_cuda_visible()  # CPU figures from a GPU node whose torch build cannot use its GPUs would mislead
    except GpuUnavailable as e:
        print(f"aligntok bench {target}: {e}")
        return 1
    module = importlib.import_module(f"aligntok.bench.{target}")
    kwargs = {"reference_root": reference_root} if reference_root is not None else {}
    result = module.run(quick=True, **kwargs) if quick else module.run(**kwargs)
    result = {"target": target, "machine": {"cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
                                            "torch": torch.__version__, "cuda": torch.cuda.is_available()}, **result}
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out:
        write_json_atomic(out, result)
    return 0
