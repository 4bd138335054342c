"""Benchmarks of the text-to-image task: `aligntok bench t2i-dit | text-cache | webdataset`.

t2i-dit: img/s of one training step of the text DiT (models/t2i_dit.py) against the class DiT (models/dit.py) of
the same depth, width, heads and patch, on the same latents: what the caption tokens cost. A step is what train-dit
runs: flow-matching loss (bf16 autocast on CUDA, as dit.amp; fp32 on CPU) + backward + AdamW step. Captions are
`caption_len` real tokens of `text_dim` encoder states (no padding column, so every token is paid for), and one row
of each batch takes the null caption, so the attention runs with a key mask as in training (at caption dropout
0.1, a batch of any real size holds such a row). The two models' steps alternate round by round, so load on a
shared machine hits both alike; figures are medians over rounds, the ratio's spread is the rounds' range. FLOPs
per step are counted once (FlopCounterMode), beside achieved FLOP/s: the FLOP ratio is what the text tokens cost on
paper (the text DiT's docstring derives ~1.3x a class block at 77 tokens), the time ratio what they cost here.
Defaults: on CUDA the paper profile's shapes (T2I-B/1, T2I-XL/1, T2I-2B/1 on 32x16x16 latents; T5-XXL's 4096-d
states, 120 tokens), on CPU small ones (tiny, T2I-B/2; all-MiniLM-L6-v2's 384-d, 32 tokens).

text-cache and webdataset call the benchmarks their modules own (`bench_text_cache`, `bench_webdataset`) and put
their figures in the same JSON envelope; a checkout without them says so in one line.
"""
from __future__ import annotations

import importlib
import statistics
import sys

import torch

from aligntok.bench.dit import _flops, _time
from aligntok.diffusion.flow import FlowMatching
from aligntok.models.dit import build_dit
from aligntok.models.t2i_dit import T2I_DIT_MODELS, build_t2i_dit
from aligntok.stages.bench import BenchOptionError, BenchUnavailable
from aligntok.train.loop import adamw, bf16_autocast, cuda_fast_math

LATENT = (32, 16, 16)  # the paper's tokenizer: 16x16 grid, 32 channels at 256 px
NUM_CLASSES = 1000
# (text DiT, batch) per device kind; the class DiT of each row has the same depth, width, heads and patch
ROWS = {"cuda": (("T2I-B/1", 64), ("T2I-XL/1", 32), ("T2I-2B/1", 16)), "cpu": (("tiny", 8), ("T2I-B/2", 4)),
        "quick": (("tiny/2", 2),)}
TEXT = {"cuda": (120, 4096), "cpu": (32, 384)}  # (caption_len, text_dim): T5-XXL at PixArt's length; MiniLM


def class_twin(name: str, input_size: int, in_channels: int) -> torch.nn.Module:
    """The class DiT with the text DiT `name`'s depth, width, heads and patch (2B has no class preset: built from
    the same numbers)."""
    dims = {k: T2I_DIT_MODELS[name].keywords[k] for k in ("depth", "hidden_size", "num_heads", "patch_size")}
    return build_dit("tiny", input_size=input_size, in_channels=in_channels, num_classes=NUM_CLASSES, **dims)


def measure(name: str, batch: int, caption_len: int, text_dim: int, device: torch.device, steps: int = 2,
            rounds: int = 3, latent: tuple[int, int, int] = LATENT) -> dict:
    """One row: the text DiT `name` and its class twin, trained on the same latents, alternating round by round."""
    if name not in T2I_DIT_MODELS:
        raise ValueError(f"bench t2i-dit model: given {name!r}; expected one of {sorted(T2I_DIT_MODELS)}")
    torch.manual_seed(0)
    fm = FlowMatching()
    x = torch.randn(batch, *latent, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    text = torch.randn(batch, caption_len, text_dim, device=device)
    mask = torch.ones(batch, caption_len, dtype=torch.bool, device=device)
    drop = torch.arange(batch, device=device) == 0  # one null caption: the key-masked attention of training
    t2i = build_t2i_dit(name, input_size=latent[1], in_channels=latent[0], text_dim=text_dim).to(device)
    cls = class_twin(name, latent[1], latent[0]).to(device)

    def text_model(xt, t, _):
        return t2i(xt, t, text, mask, drop=drop)

    def step_of(model, fn, cond):
        opt = adamw(model.parameters(), device, lr=1e-4)

        def step():
            with bf16_autocast(device):
                loss, _ = fm.loss(fn, x, cond)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    steps_of = {"t2i": step_of(t2i, text_model, None), "class": step_of(cls, cls, y)}
    flops = {k: _flops(fn) for k, fn in steps_of.items()}  # doubles as the warm-up (AdamW state allocated)
    times = {k: [] for k in steps_of}
    for _ in range(rounds):
        for k, fn in steps_of.items():
            times[k].append(_time(fn, steps, device))
    ratios = [tt / tc for tt, tc in zip(times["t2i"], times["class"])]
    med = {k: statistics.median(v) for k, v in times.items()}
    dims = T2I_DIT_MODELS[name].keywords
    return {"model": name, "depth": dims["depth"], "width": dims["hidden_size"], "patch": dims["patch_size"],
            "latent": list(latent), "image_tokens": (latent[1] // dims["patch_size"]) ** 2, "batch": batch,
            "caption_len": caption_len, "text_dim": text_dim, "steps_per_round": steps, "rounds": rounds,
            "t2i_params_M": sum(p.numel() for p in t2i.parameters()) / 1e6,
            "class_params_M": sum(p.numel() for p in cls.parameters()) / 1e6,
            "t2i_s_per_step": med["t2i"], "class_s_per_step": med["class"],
            "t2i_img_per_s": batch / med["t2i"], "class_img_per_s": batch / med["class"],
            "t2i_flop_per_step": flops["t2i"], "class_flop_per_step": flops["class"],
            "t2i_achieved_flop_s": flops["t2i"] / med["t2i"], "class_achieved_flop_s": flops["class"] / med["class"],
            "flop_ratio": flops["t2i"] / flops["class"],
            "time_ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "s_per_step_per_round": times}


def _positive(name: str, value, default):
    if value is None:
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise BenchOptionError(f"aligntok bench {name}: given {value!r}; expected a positive integer")
    return n


def run(quick: bool = False, caption_len: int | None = None, text_dim: int | None = None,
        device: str | torch.device | None = None, rows=None, steps: int | None = None,
        rounds: int | None = None) -> dict:
    """`aligntok bench t2i-dit`: one row per (text DiT, batch) of ROWS for this device (quick: tiny/2 at batch 2,
    one step per round, 2 rounds); caption_len and text_dim default to TEXT for the device."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda_fast_math(dev)
    kind = "cuda" if dev.type == "cuda" else "cpu"
    caption_len = _positive("--caption-len", caption_len, TEXT[kind][0])
    text_dim = _positive("--text-dim", text_dim, TEXT[kind][1])
    rows = rows or ROWS["quick" if quick else kind]
    steps = steps or (1 if quick else 2)
    rounds = rounds or (2 if quick else 3)
    out = [measure(name, batch, caption_len, text_dim, dev, steps, rounds) for name, batch in rows]
    lines = [f"text DiT vs class DiT of the same depth/width, train step ({dev}, {torch.get_num_threads()} threads, "
             f"{'bf16 autocast' if kind == 'cuda' else 'fp32'}); captions {caption_len} tokens x {text_dim}",
             "model | batch | image tokens | t2i img/s | class img/s | time ratio (rounds) | FLOP ratio | params M"]
    for r in out:
        tr = r["time_ratio"]
        lines.append(f"{r['model']} | {r['batch']} | {r['image_tokens']} | {r['t2i_img_per_s']:.2f} | "
                     f"{r['class_img_per_s']:.2f} | {tr['median']:.2f}x ({tr['min']:.2f}-{tr['max']:.2f}) | "
                     f"{r['flop_ratio']:.2f}x | {r['t2i_params_M']:.1f} vs {r['class_params_M']:.1f}")
    print("\n".join(lines), file=sys.stderr)
    return {"device": str(dev), "threads": torch.get_num_threads(), "amp": kind == "cuda",
            "caption_len": caption_len, "text_dim": text_dim, "rows": out, "summary": lines}


def _lazy(target: str, where: tuple[str, ...], name: str):
    """Function `name` from the first module of `where` that has it; none: BenchUnavailable, one line."""
    reasons = []
    for module in where:
        try:
            fn = getattr(importlib.import_module(module), name, None)
        except ImportError as e:
            reasons.append(f"{module}: {(str(e).splitlines() or [''])[0][:100]}")
            continue
        if fn is not None:
            return fn
        reasons.append(f"{module} has no {name}")
    raise BenchUnavailable(f"aligntok bench {target}: {name} is not in this checkout ({'; '.join(reasons)}); "
                           f"expected it in {' or '.join(m.replace('.', '/') + '.py' for m in where)}")


def run_text_cache(quick: bool = False, encoder: str | None = None, captions: int | None = None,
                   caption_len: int | None = None, device: str | torch.device | None = None) -> dict:
    """`aligntok bench text-cache`: captions/s of the text-embedding cache's writer (`bench_text_cache`)."""
    fn = _lazy("text-cache", ("aligntok.bench.text", "aligntok.stages.text"), "bench_text_cache")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kw = {"encoder": encoder or "all-MiniLM-L6-v2", "captions": _positive("--captions", captions, 64 if quick else 512),
          "max_tokens": _positive("--caption-len", caption_len, 32), "batch_size": 32 if quick else 64}
    rate = fn(**kw, device=dev)
    figures = dict(rate) if isinstance(rate, dict) else {"captions_per_s": float(rate)}
    rate = figures.get("captions_per_s")
    shown = f"{rate:.1f}" if isinstance(rate, (int, float)) else rate
    line = (f"text cache ({kw['encoder']}, {kw['max_tokens']} tokens, batch {kw['batch_size']}, {dev}): "
            f"{shown} captions/s")
    print(line, file=sys.stderr)
    return {"device": str(dev), **kw, **figures, "summary": [line]}


def run_webdataset(quick: bool = False, workers: str | int | None = None, images: int | None = None,
                   resolution: int | None = None) -> dict:
    """`aligntok bench webdataset`: img/s of prepare over WebDataset tar shards (`bench_webdataset`), one row per
    worker count (`workers`: a count or a comma list; default 1 and every usable CPU)."""
    fn = _lazy("webdataset", ("aligntok.bench.webdataset",), "bench_webdataset")
    from aligntok.cpus import usable_cpus
    counts = sorted({1, usable_cpus()}) if workers is None or workers == "" else \
        [_positive("--workers", w, None) for w in str(workers).split(",")]
    images = _positive("--images", images, 32 if quick else 256)
    resolution = _positive("--resolution", resolution, 32 if quick else 64)
    rows = [fn(workers=w, images=images, resolution=resolution) for w in counts]
    lines = ["webdataset prepare: workers | images | resolution | img/s"] + [
        f"{r.get('workers')} | {r.get('images')} | {r.get('resolution')} | {r.get('img_per_s')}" for r in rows]
    print("\n".join(lines), file=sys.stderr)
    return {"rows": rows, "summary": lines}
