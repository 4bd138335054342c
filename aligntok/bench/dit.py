"""LightningDiT throughput on 16x16x32 latents: train step (forward + backward + AdamW) and sampling (one Euler
step, and a 30-step sampler derived from it), with FLOPs from FlopCounterMode and achieved FLOP/s against a
float32 GEMM peak measured in the same run, plus the SDPA kernel the attention actually dispatched to.

`reference` compares our train step with LightningDiT's own model code, loaded by aligntok.bench.reference from a
checkout outside this repository (LIGHTNINGDIT_ROOT; without it the comparison is skipped with one line saying how
to get it, and our model is timed alone), on the same config, weights, batch and optimizer, in this process: eager against eager, and our dit.compile against
the reference as it ships (its blocks, final layer, embedders, modulate and SwiGLU under torch.compile). Issue 11's
goal is ours >= 1.2x the reference."""
from __future__ import annotations

import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from aligntok.diffusion.flow import FlowMatching
from aligntok.bench.reference import build_reference, reference_key, unavailable_reason
from aligntok.diffusion.sampler import sample
from aligntok.models.dit import build_dit
from aligntok.stages.bench import gemm_peak_flops
from aligntok.train.loop import adamw, cuda_fast_math

LATENT = (32, 16, 16)
NUM_CLASSES = 1000
SAMPLER_STEPS = 30
GOAL = 1.2  # issue 11: our train step >= 1.2x the reference model code's


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


def _share_weights(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Make the reference's parameters our Parameter objects (same weights, one AdamW state for both): the two
    models then fit in memory together even at XL/1, and every step of either trains the same weights."""
    params = dict(ours.named_parameters())
    for name, _ in list(ours.named_parameters()):
        mod_name, _, attr = reference_key(name).rpartition(".")
        mod = ref.get_submodule(mod_name)
        if getattr(mod, attr).shape != params[name].shape:
            raise ValueError(f"reference {reference_key(name)}: shape {tuple(getattr(mod, attr).shape)}, "
                             f"ours {name}: {tuple(params[name].shape)}")
        setattr(mod, attr, params[name])


def compare_reference(name: str, batch: int, steps: int, rounds: int, device: torch.device,
                      compiled: bool = True, root=None) -> dict:
    """Train steps of ours and of the reference, interleaved: each round times `steps` steps of every variant
    (ours / reference, eager / compiled) back to back, so load on the machine hits all of them alike; the
    per-round ratios give the spread. Compiled variants get one untimed step first (their compile)."""
    torch.manual_seed(0)
    model = build_dit(name, input_size=LATENT[1], in_channels=LATENT[0], num_classes=NUM_CLASSES).to(device)
    ref = build_reference(name, input_size=LATENT[1], in_channels=LATENT[0], num_classes=NUM_CLASSES,
                          root=root).to(device)
    _share_weights(model, ref)
    opt = adamw(model.parameters(), device, lr=1e-4)
    fm = FlowMatching()
    x = torch.randn(batch, *LATENT, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def step(m, stance):
        def run_step():
            with torch.compiler.set_stance(stance):
                loss, _ = fm.loss(m, x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return run_step

    model.compiled = False
    variants = {"ours_eager": step(model, "default"), "reference_eager": step(ref, "force_eager")}
    if compiled:
        variants["ours_compiled"] = step(model, "default")
        variants["reference_compiled"] = step(ref, "default")  # the reference as it ships

    def set_mode(key):
        model.compiled = key == "ours_compiled"

    set_mode("ours_eager")
    flops = _flops(variants["ours_eager"])  # the same model FLOPs for every variant (eager count)
    first = {}
    for key, fn in variants.items():
        set_mode(key)
        t0 = time.perf_counter()
        fn()  # warm-up; for the compiled variants, the compile
        first[key] = time.perf_counter() - t0
    times = {key: [] for key in variants}
    for _ in range(rounds):
        for key, fn in variants.items():
            set_mode(key)
            times[key].append(_time(fn, steps, device))
    set_mode("ours_eager")
    out = {"model": name, "batch": batch, "steps_per_round": steps, "rounds": rounds, "train_flop_per_step": flops,
           "first_step_s": first, "s_per_step_per_round": times}
    for key, ts in times.items():
        med = statistics.median(ts)
        out[f"{key}_img_per_s"] = batch / med
        out[f"{key}_achieved_flop_s"] = flops / med

    def ratio(a, b):  # speed of a over b: per-round, then median and range
        r = [tb / ta for ta, tb in zip(times[a], times[b])]
        return {"median": statistics.median(r), "min": min(r), "max": max(r)}

    pairs = [("ours_eager", "reference_eager")]
    if compiled:
        pairs += [("ours_compiled", "reference_compiled"), ("ours_eager", "reference_compiled"),
                  ("ours_compiled", "reference_eager")]
    out["speedup"] = {f"{a}_over_{b}": ratio(a, b) for a, b in pairs}
    return out


def _summary(result: dict) -> list[str]:
    lines = [f"GEMM peak (float32, {result['device']}, {result['threads']} threads): "
             f"{result['gemm_peak_flop_s'] / 1e9:.1f} GFLOP/s at start, "
             f"{result['gemm_peak_flop_s_end'] / 1e9:.1f} after the comparison (fractions: of the larger)"]
    if not result["reference"]:
        return lines + ["no reference comparison" + (" (LightningDiT's model code not available)"
                                                     if result.get("reference_unavailable") else "")]
    lines += ["reference = LightningDiT's model code; _compiled: ours with dit.compile, the reference as it ships",
              "model | batch | variant | img/s | fraction of GEMM peak"]
    for r in result["reference"]:
        for key in ("ours_eager", "reference_eager", "ours_compiled", "reference_compiled"):
            if f"{key}_img_per_s" in r:
                lines.append(f"{r['model']} | {r['batch']} | {key} | {r[f'{key}_img_per_s']:.3f} | "
                             f"{r[f'{key}_fraction_of_gemm_peak']:.3f}")
        for pair, v in r["speedup"].items():
            lines.append(f"{r['model']} batch {r['batch']}: {pair} = {v['median']:.3f}x "
                         f"(rounds {v['min']:.3f}-{v['max']:.3f}); goal {GOAL}x "
                         f"{'met' if v['median'] >= GOAL else 'not met'}")
    return lines


def run(batch_sizes=(2, 4, 8), models=("tiny", "LightningDiT-XL/1"), steps: int = 3, quick: bool = False,
        device: str | torch.device | None = None,
        reference=(("LightningDiT-B/1", 4), ("LightningDiT-XL/1", 2)), reference_rounds: int = 3,
        reference_compile: bool = True, reference_root=None) -> dict:
    """Timed steps per row: `steps` (XL-sized models: at most 2). quick: tiny at batch 2 only, and the reference
    comparison on tiny at batch 4, eager only.

    The tiny rows also time the train step with dit.grad_checkpointing and (not with quick: on a CPU the compile
    alone takes about a minute, reported as first_step_s_compile) with dit.compile's steady-state step.
    `reference`: (model, batch) pairs compared with LightningDiT's model code, `reference_rounds` rounds of 2 steps
    (XL: 1) per variant, with the compiled variants unless reference_compile is False. The reference is LightningDiT's
    checkout at `reference_root` or LIGHTNINGDIT_ROOT; when it is missing, one line says how to get it and the
    comparison is left out (result["reference_unavailable"] holds that line)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda_fast_math(dev)
    if quick:
        batch_sizes, models = (2,), ("tiny",)
        reference, reference_rounds, reference_compile = (("tiny", 4),), 2, False
    missing = unavailable_reason(reference_root) if reference else None
    if missing:
        print(f"bench dit: reference comparison skipped: {missing}", file=sys.stderr)
        reference = ()
    peak = gemm_peak_flops(dev)
    rows = []
    for name in models:
        for b in batch_sizes:
            variants = () if name != "tiny" else ("grad_checkpointing",) if quick else ("grad_checkpointing", "compile")
            r = measure(name, b, min(steps, 2) if "XL" in name else steps, dev, variants)
            r["train_fraction_of_gemm_peak"] = r["train_achieved_flop_s"] / peak
            r["sample_fraction_of_gemm_peak"] = r["sample_achieved_flop_s"] / peak
            rows.append(r)
    compared = [compare_reference(name, b, 1 if "XL" in name else 2, reference_rounds, dev, reference_compile,
                                  reference_root) for name, b in reference]
    # the peak again after the comparison: on a shared machine the two differ, and the larger is the yardstick
    best = max(peak, peak_end := gemm_peak_flops(dev))
    for r in compared:
        for key in ("ours_eager", "reference_eager", "ours_compiled", "reference_compiled"):
            if f"{key}_achieved_flop_s" in r:
                r[f"{key}_fraction_of_gemm_peak"] = r[f"{key}_achieved_flop_s"] / best
    result = {"device": str(dev), "threads": torch.get_num_threads(), "latent_shape": list(LATENT),
              "gemm_peak_flop_s": peak, "attention_backend": attention_backend(dev), "rows": rows,
              "reference": compared, "reference_unavailable": missing, "gemm_peak_flop_s_end": peak_end, "gemm_peak_flop_s_best": best}
    result["goal"] = {"ratio": GOAL, "met": {f"{r['model']} batch {r['batch']}: {k}": v["median"] >= GOAL
                                             for r in compared for k, v in r["speedup"].items()}}
    result["summary"] = _summary(result)
    print("\n".join(result["summary"]), file=sys.stderr)
    return result
