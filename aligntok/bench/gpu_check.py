"""`make gpu-check`: what a first run of the paper profile (profiles/imagenet256.yaml) needs from a GPU node,
measured in one command in the environment at hand, in under 8 minutes on one H200.

Rows, each timing the code the pipeline runs after an untimed warm-up, on random weights (the node may be offline),
at the profile's sizes per GPU: LightningDiT train steps per batch (eager, dit.grad_checkpointing, and dit.compile
with static shapes per batch, the graphs compiled during the timed steps counted as recompiles), one Euler sampling
step, a DDP train step on every visible GPU (NCCL) against one, a tokenizer stage-2 step (DINOv2-L, 32 images,
semantic preservation, GAN, EMA), cache-latents and evaluate throughput on a few hundred synthetic images, FID
Inception feature throughput; each with its peak memory (torch.cuda.max_memory_allocated, reset per row).
A row that would not fit in what is left of --budget-s is skipped with that reason, a failed row is recorded and the
others still run. Prints a markdown table; --out gets the JSON, rewritten after every row.

Without CUDA it stops in one line with exit 1 (--cpu-dry-run runs every row at toy sizes on the CPU instead: the
plumbing, not a measurement); so it does when nvidia-smi lists GPUs that torch cannot use.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from aligntok.bench import gpu_rows
from aligntok.bench.gpu_ddp import ROOT, ddp_row
from aligntok.bench.gpu_dit import DitTrain

ROWS = ("dit", "sample", "tokenizer", "latents", "evaluate", "inception", "ddp", "compile")
PROFILE = ROOT / "profiles" / "imagenet256.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("--profile", default=str(PROFILE), help="params file the sizes come from")
    p.add_argument("--model", help="DiT (default: the profile's dit.model)")
    p.add_argument("--batches", type=int, nargs="+", help="DiT train batches per GPU (default 32 64 and the "
                   "profile's per GPU)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row (compiles happen here)")
    p.add_argument("--sample-batch", type=int, default=128)
    p.add_argument("--images", type=int, default=500, help="images of the cache-latents, evaluate and Inception "
                   "rows (each rounded to whole batches: one shape, tuned in the warm-up)")
    p.add_argument("--eval-steps", type=int, nargs=2, default=[10, 30], metavar=("LO", "HI"),
                   help="sampler steps evaluate is timed at, extrapolated to the profile's")
    p.add_argument("--inception-weights", help="inception-2015-12-05.pt (default: evaluate's cached copy, else "
                   "a random-init Inception-V3)")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run (the others: skipped)")
    p.add_argument("--skip-compile", action="store_true", help="no dit.compile rows (no compile time)")
    p.add_argument("--budget-s", type=float, default=400, help="no row starts that would end after this")
    p.add_argument("--cpu-dry-run", action="store_true", help="every row at toy sizes on the CPU (tests)")
    p.add_argument("--out", default="outputs/gpu_check.json")
    return p.parse_args(argv)


@dataclass
class Spec:
    key: str  # its --rows name
    part: str
    model: str
    batch: int | None
    options: str
    nominal_s: float  # what the row takes on one H200, warm-up and compile included: the budget check
    run: Callable[[float], dict]  # deadline (time.perf_counter) -> figures
    after: Callable[[], None] | None = None  # runs whatever became of the row
    skip: str | None = None


def whole(n: int, batch: int) -> int:
    """n rounded to whole batches (at least one)."""
    return max(1, round(n / batch)) * batch


def specs(args: argparse.Namespace, params) -> tuple[torch.device, list[Spec]]:
    """The rows at the profile's sizes (toy sizes with --cpu-dry-run)."""
    from aligntok.bench.tokenizer import CONFIGS
    from aligntok.data.dataset import loader_workers
    from aligntok.stages.tokenizer import tokenizer_config

    dry = args.cpu_dry_run
    per_gpu = max(1, params.dit.batch_size // params.launcher.nproc_per_node)
    tok = CONFIGS["tiny@64"] if dry else {**tokenizer_config(params), "encoder_pretrained": "none"}
    grid = 8 if dry else tok["image_size"] // tok["latent_stride"]
    latent = (tok["latent_channels"], grid, grid)
    dit = "tiny" if dry else args.model or params.dit.model
    batches = [2] if dry else args.batches or sorted({32, 64, per_gpu})
    images = 4 if dry else args.images
    warmup, steps, budget = (1, min(args.steps, 2), 30.0) if dry else (args.warmup, args.steps, 10.0)
    ev = params.eval.model_copy(update={"batch_size": 2}) if dry else params.eval
    latents = params.latents.model_copy(update={"batch_size": 4, "shard_rows": 8}) if dry else params.latents
    stage2, s = params.tokenizer.stage2, params.sample
    tok_batch = 2 if dry else max(1, stage2.batch_size // params.launcher.nproc_per_node)
    res = tok["image_size"]
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    gpus = 0 if dry else torch.cuda.device_count()
    procs = 2 if dry else gpus
    # a rank's loader workers as cache-latents gives them (data.num_workers null: its share of this node's CPUs)
    workers = 1 if dry else loader_workers(params.data.num_workers, max(1, gpus))
    eval_steps = (1, 2) if dry else tuple(args.eval_steps)
    weights = gpu_rows.inception_file(args.inception_weights)
    eager, compiled = DitTrain(dit, latent, device), DitTrain(dit, latent, device)

    out = [Spec("dit", "dit train", dit, b, "grad ckpt" if remat else "eager", 20 if b == batches[0] else 10,
                lambda _, b=b, remat=remat: eager.train_row(b, False, remat, warmup, steps, budget))
           for remat in (False, True) for b in batches]
    out += [
        Spec("sample", "dit sample", dit, 2 if dry else args.sample_batch, "eager, no CFG", 10,
             lambda _: eager.sample_row(2 if dry else args.sample_batch, warmup, steps, budget), after=eager.close),
        Spec("tokenizer", "tokenizer stage 2 train", tok["encoder_arch"], tok_batch, f"{res} px, bf16", 60,
             lambda _: gpu_rows.tokenizer_stage2(tok, stage2, params.lpips.net, tok_batch, device, warmup, steps,
                                                 budget)),
        Spec("latents", "cache-latents encode", tok["encoder_arch"], latents.batch_size, f"{res} px, bf16", 45,
             lambda _: gpu_rows.cache_latents(tok, latents, whole(images, latents.batch_size), workers, device)),
        Spec("evaluate", "evaluate sample + decode", f"{dit} + decoder", ev.batch_size,
             f"{s.method} {s.steps} steps, CFG {ev.cfg_scale:g} (t >= {s.cfg_interval_start:g}, "
             f"{s.cfg_channels} ch), bf16", 60,
             lambda _: gpu_rows.evaluate(tok, dit, s, ev, whole(images, ev.batch_size), eval_steps, device)),
        Spec("inception", "FID Inception features", "Inception-V3", ev.batch_size, "fp32", 20,
             lambda _: gpu_rows.inception(weights, whole(images, ev.batch_size), ev.batch_size, res, device)),
        Spec("ddp", "dit train DDP", dit, 2 if dry else per_gpu,
             f"{procs} {'processes' if dry else 'GPU' if procs == 1 else 'GPUs'}", 120,
             lambda deadline: ddp_row(dit, 2 if dry else per_gpu, 1 if dry else steps, procs,
                                      max(60.0, deadline - time.perf_counter())),
             skip=None if procs > 1 else f"{gpus} GPU visible: DDP needs 2 or more (CUDA_VISIBLE_DEVICES)"),
    ]
    ordered = sorted(batches, key=lambda b: (b != per_gpu, -b))  # the profile's batch first, then the largest
    for i, b in enumerate(ordered):
        for remat in (False, True):
            out.append(Spec("compile", "dit train", dit, b, "compile + grad ckpt" if remat else "compile",
                            20 if remat else 60 if i == 0 else 45,
                            lambda _, b=b, remat=remat: compiled.train_row(b, True, remat, warmup, steps, budget),
                            after=compiled.close if i == len(ordered) - 1 and remat else None))
    return device, out


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(spec: Spec, device: torch.device, deadline: float) -> dict:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        figures = {"status": "ok", **spec.run(deadline)}
    except torch.OutOfMemoryError:
        figures = {"status": "oom", "note": "out of memory"}
    except Exception as e:  # noqa: BLE001 - recorded in its row; the other rows still run
        lines = str(e).strip().splitlines()
        figures = {"status": "failed", "note": f"{type(e).__name__}: {lines[0] if lines else ''}"}
    figures["row_s"] = time.perf_counter() - t0
    figures.setdefault("peak_gib", torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None)
    return figures


def run_rows(rows_specs: list[Spec], device: torch.device, selected: set[str], budget_s: float,
             on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
    deadline = time.perf_counter() + budget_s
    rows = []
    for s in rows_specs:
        row = {"part": s.part, "model": s.model, "batch": s.batch, "options": s.options}
        left = deadline - time.perf_counter()
        if s.key not in selected:
            row.update(status="skipped", note=f"not in --rows ({s.key})")
        elif s.skip:
            row.update(status="skipped", note=s.skip)
        elif left < s.nominal_s:
            row.update(status="skipped", note=f"time budget: {max(left, 0):.0f} s of --budget-s {budget_s:g} left, "
                                              f"the row takes ~{s.nominal_s:g} s")
        else:
            row.update(measure(s, device, deadline))
        if s.after:
            s.after()
        _free(device)
        rows.append(row)
        on_row(row)
    return rows


COLUMNS = ("part", "model", "batch", "options", "img/s", "ms/batch", "peak GiB", "recompiles", "row s", "notes")


def cells(row: dict) -> list[str]:
    """A row's table cells: figures of rows that did not run are n/a, the notes say why."""
    ok = row.get("status") == "ok"

    def num(key, fmt, scale=1.0):
        v = row.get(key)
        return format(v * scale, fmt) if ok and isinstance(v, (int, float)) else "n/a"
    status = row.get("status")
    note = row.get("note", "")
    notes = {"ok": note, "oom": f"OOM{': ' + note if note != 'out of memory' else ''}",
             "skipped": f"skipped: {note}", "failed": f"failed: {note}"}.get(status, note)
    recompiles = row.get("recompiles")
    return [str(row["part"]), str(row["model"]), "" if row.get("batch") is None else str(row["batch"]),
            str(row["options"]), num("img_per_s", ",.1f"), num("s_per_step", ",.1f", 1e3),
            "n/a" if row.get("peak_gib") is None else f"{row['peak_gib']:.2f}",
            "" if recompiles is None else str(recompiles),
            "" if row.get("row_s") is None else f"{row['row_s']:.0f}", notes]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from aligntok.config import ConfigError, load_params
    from aligntok.io import write_json_atomic
    from aligntok.launch import GpuUnavailable, check_cuda_visible
    from aligntok.train.loop import cuda_fast_math

    args = parse_args(argv)
    if not args.cpu_dry_run:
        try:
            check_cuda_visible()
        except GpuUnavailable as e:
            print(f"gpu-check: {e}")
            return 1
        if not torch.cuda.is_available():
            print("gpu-check: needs a CUDA GPU and torch sees none here; nothing measured (--cpu-dry-run runs "
                  "every row at toy sizes on the CPU)")
            return 1
    try:
        params = load_params(args.profile, check_paths=False)
    except ConfigError as e:
        print(f"gpu-check: {e}")
        return 2
    device, rows_specs = specs(args, params)
    cuda_fast_math(device)
    head = {"mode": "cpu dry run (toy sizes: not a measurement)" if args.cpu_dry_run else "gpu",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "gpus": torch.cuda.device_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "profile": args.profile, "args": vars(args)}
    done: list[dict] = []
    t0 = time.perf_counter()

    def report(row: dict) -> None:
        done.append(row)
        print("gpu-check: " + " | ".join(cells(row)), file=sys.stderr, flush=True)
        write_json_atomic(args.out, {**head, "rows": done})

    selected = set(args.rows) - ({"compile"} if args.skip_compile else set())
    rows = run_rows(rows_specs, device, selected, args.budget_s, report)
    table = markdown_table(rows)
    write_json_atomic(args.out, {**head, "rows": rows, "wall_s": time.perf_counter() - t0, "table": table})
    print(table)
    failed = [r for r in rows if r["status"] == "failed"]
    print(f"gpu-check: {len(rows)} rows, {len(failed)} failed, {time.perf_counter() - t0:.0f} s -> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
