"""`aligntok bench <target>`: throughput figures on this machine, printed as JSON (and saved with --out)."""
from __future__ import annotations

import importlib
import json
import platform

import torch

from aligntok.io import write_json_atomic


def gemm_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Achievable float32 GEMM FLOP/s here (best of `repeats`), the yardstick for achieved FLOP/s."""
    import time
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def run_bench(target: str, out: str | None, quick: bool = False) -> int:
    module = importlib.import_module(f"aligntok.bench.{target}")
    result = module.run(quick=True) if quick else module.run()
    result = {"target": target, "machine": {"cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
                                            "torch": torch.__version__, "cuda": torch.cuda.is_available()}, **result}
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out:
        write_json_atomic(out, result)
    return 0
