"""`aligntok bench <target>`: throughput figures on this machine, printed as JSON (and saved with --out)."""
from __future__ import annotations

import importlib
import json
import platform

import torch

from aligntok.io import write_json_atomic

# Targets whose runner is not aligntok.bench.<target>.run: (module, function).
RUNNERS = {"t2i-dit": ("aligntok.bench.t2i", "run"), "text-cache": ("aligntok.bench.t2i", "run_text_cache"),
           "webdataset": ("aligntok.bench.t2i", "run_webdataset")}
# The options (besides --out and --quick) each target takes; any other given is refused in one line.
OPTIONS = {"dit": ("reference_root",), "t2i-dit": ("caption_len", "text_dim"),
           "text-cache": ("encoder", "captions", "caption_len"), "webdataset": ("workers", "images", "resolution")}


class BenchUnavailable(RuntimeError):
    """The target's benchmark is not in this checkout (one line)."""


class BenchOptionError(ValueError):
    """A bench option out of range (one line)."""


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


def run_bench(target: str, out: str | None, quick: bool = False, reference_root: str | None = None,
              **options) -> int:
    """Runs aligntok.bench.<target>.run (or RUNNERS[target]) with the options given (None: not given)."""
    options = {k: v for k, v in {"reference_root": reference_root, **options}.items() if v is not None}
    for key in options:
        if key not in OPTIONS.get(target, ()):
            takes = " and ".join(f"`bench {t}`" for t, keys in OPTIONS.items() if key in keys)
            print(f"aligntok bench {target}: --{key.replace('_', '-')} applies to {takes} only")
            return 2
    from aligntok.launch import GpuUnavailable, check_cuda_visible
    try:
        check_cuda_visible()  # CPU figures from a GPU node whose torch build cannot use its GPUs would mislead
    except GpuUnavailable as e:
        print(f"aligntok bench {target}: {e}")
        return 1
    module, function = RUNNERS.get(target, (f"aligntok.bench.{target}", "run"))
    runner = getattr(importlib.import_module(module), function)
    try:
        result = runner(quick=True, **options) if quick else runner(**options)
    except BenchOptionError as e:
        print(e)
        return 2
    except BenchUnavailable as e:
        print(e)
        return 1
    result = {"target": target, "machine": {"cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
                                            "torch": torch.__version__, "cuda": torch.cuda.is_available()}, **result}
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out:
        write_json_atomic(out, result)
    return 0
