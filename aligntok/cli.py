"""`aligntok <stage> --params params.yaml -S key=value`: the entry point dvc.yaml and the Prefect flow call.

The CLI only parses, validates params (exit code 2 with one line on any problem) and hands over to
`aligntok.stages.<module>.run(params, args)`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import signal
import sys
from pathlib import Path

from aligntok.config import ConfigError, load_params

# Stage name -> module in aligntok.stages. Order is the DAG order (dvc.yaml follows it; a test checks).
STAGES = {
    "prepare": "prepare",
    "judge": "judge",
    "tokenizer-stage1": "tokenizer",
    "tokenizer-stage2": "tokenizer",
    "tokenizer-stage3": "tokenizer",
    "cache-latents": "latents",
    "cache-text": "text",
    "train-dit": "dit",
    "evaluate": "evaluate",
}
# Stages that may run as several processes (torchrun) when launcher.nproc_per_node > 1.
DISTRIBUTED = {"tokenizer-stage1", "tokenizer-stage2", "tokenizer-stage3", "cache-latents", "cache-text", "train-dit",
               "evaluate", "sample"}
HELP = {
    "prepare": "build parquet shards + manifest from a synthetic, image-folder or parquet source",
    "judge": "train the independent judge classifier on held-out synthetic images (class accuracy, fd_judge)",
    "tokenizer-stage1": "stage 1: frozen encoder; train adapter + decoder",
    "tokenizer-stage2": "stage 2: train all, with semantic preservation against the frozen stage-1 model",
    "tokenizer-stage3": "stage 3: decoder-only refinement; exports the final tokenizer",
    "cache-latents": "encode the train split with the final tokenizer into latent shards + latent_stats",
    "cache-text": "text task: encode the train captions with the frozen text encoder into a memory-mapped cache",
    "train-dit": "train LightningDiT (class- or text-conditioned) with flow matching on the cached latents",
    "evaluate": "gFID/IS/precision/recall of samples and rFID/PSNR/SSIM/LPIPS of the tokenizer",
    "sample": "sample a labelled PNG grid, or N images to an ADM-layout .npz",
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param by its dotted key (repeatable), e.g. -S tokenizer.stage2.lr=1e-5")


def build_parser() -> argparse.ArgumentParser:
    from aligntok import __version__

    parser = argparse.ArgumentParser(prog="aligntok", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name in [*STAGES, "sample"]:
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        _common(p)
        if name == "sample":
            p.add_argument("--out", default="outputs/samples/grid.png", help="PNG grid path")
            p.add_argument("--npz", type=int, default=0, metavar="N", help="write N samples to --npz-out instead")
            p.add_argument("--npz-out", default="outputs/samples/samples.npz")
            p.add_argument("--cfg-scale", type=float, default=None)
        if name == "evaluate":
            p.add_argument("--samples", help="score an ADM-format .npz of samples instead of sampling the DiT")
            p.add_argument("--reference", help="an ADM reference batch .npz instead of the prepared train images")
            p.add_argument("--out", help="metrics file (default outputs/metrics/evaluate.json)")
    b = sub.add_parser("bench", help="benchmarks: throughput and FLOP/s on this machine")
    b.add_argument("target", choices=["prepare", "tokenizer", "dit", "ddp", "eval", "scale", "loader", "sync",
                                      "t2i-dit", "text-cache", "webdataset"])
    b.add_argument("--out", help="also write the figures as JSON here")
    b.add_argument("--quick", action="store_true", help="fewer steps/sizes (CI smoke of the benchmark)")
    b.add_argument("--reference-root", metavar="DIR",
                   help="dit only: LightningDiT checkout to compare with (default: $LIGHTNINGDIT_ROOT)")
    b.add_argument("--caption-len", type=int,
                   help="t2i-dit: caption tokens (default: 120 on CUDA, 32 on CPU); text-cache: max_tokens (32)")
    b.add_argument("--text-dim", type=int, help="t2i-dit: encoder state width (default: 4096 on CUDA, 384 on CPU)")
    b.add_argument("--encoder", help="text-cache: text encoder id or folder (default: all-MiniLM-L6-v2)")
    b.add_argument("--captions", type=int, help="text-cache: captions encoded (default: 512)")
    b.add_argument("--workers", help="webdataset: reader processes, a count or a comma list (default: 1 and all CPUs)")
    b.add_argument("--images", type=int, help="webdataset: images in the tar shards (default: 256)")
    b.add_argument("--resolution", type=int, help="webdataset: prepared image side (default: 64)")
    c = sub.add_parser("compare", help="print MLflow pipeline runs side by side: differing params, key metrics")
    _common(c)
    c.add_argument("--experiment", default=None)
    c.add_argument("--format", choices=["md", "csv"], default="md")
    st = sub.add_parser("study-report", help="reports/study.md + plots from the study's MLflow runs (make study)")
    _common(st)
    st.add_argument("--experiment", default=None)
    st.add_argument("--out", default="reports")
    st.add_argument("--command-line", default="make study", help="the command recorded in the report")
    st.add_argument("--task", choices=["class", "text"], default="class",
                    help="text: the text-to-image study (make study-t2i) into reports/study-t2i.md")
    sm = sub.add_parser("summary", help="the last run's metrics with their protocol labels, image paths, MLflow UI")
    _common(sm)
    pr = sub.add_parser("profile", help="switch params.yaml to a profile in profiles/ (smoke, ci, imagenet256, "
                        "t2i-smoke, t2i-laion256)")
    pr.add_argument("name")
    pr.add_argument("--params", default="params.yaml")
    t = sub.add_parser("tracking", help="`tracking sync`: send metric points kept locally during an MLflow outage")
    t.add_argument("action", choices=["sync"])
    _common(t)
    pf = sub.add_parser("preflight", help="check a profile before its first run: weights (fetched into the caches "
                        "when online), data, reference, CUDA and driver, disk, shared folder, multi-node settings")
    _common(pf)
    r = sub.add_parser("repro", help="`dvc repro` under one MLflow parent run (extra args go to dvc)")
    _common(r)
    r.add_argument("dvc_args", nargs=argparse.REMAINDER)
    return parser


def _maybe_torchrun(command: str, params) -> None:
    """Distributed stages re-exec themselves under torchrun (and srun under Slurm); see aligntok.launch."""
    if command not in DISTRIBUTED:
        return
    from aligntok.launch import launch_command
    cmd = launch_command(params.launcher, sys.argv[1:])
    if cmd:
        os.execvp(cmd[0], cmd)


def _terminate(signum, frame):
    """SIGTERM (Prefect cancel, Slurm preemption, a timeout) unwinds like Ctrl-C, so runs end as KILLED."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "profile":
            return _switch_profile(args.name, Path(args.params))
        if args.command == "bench":
            from aligntok.stages.bench import run_bench
            return run_bench(args.target, args.out, args.quick, args.reference_root,
                             **{k: getattr(args, k) for k in ("caption_len", "text_dim", "encoder", "captions",
                                                              "workers", "images", "resolution")})
        # preflight reports missing paths as rows of its table, not as the first config error
        params = load_params(args.params, args.overrides, check_paths=args.command != "preflight")
    except ConfigError as e:
        print(f"aligntok: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "compare":
        from aligntok.stages.compare import run as compare
        return compare(params, args)
    if args.command == "tracking":
        from aligntok.tracking.journal import SyncFailed, sync_journals
        try:
            sync_journals(params)
        except SyncFailed as e:
            print(f"aligntok: {e}", file=sys.stderr)
            return 1
        return 0
    if args.command == "repro":
        from aligntok.stages.repro import run as repro
        return repro(params, args)
    if args.command == "study-report":
        from aligntok.stages.study import run as study_report
        return study_report(params, args)
    if args.command == "summary":
        from aligntok.stages.summary import run as summary
        return summary(params, args)
    if args.command == "preflight":
        return _preflight(params, Path(args.params))
    from aligntok.launch import GpuUnavailable
    from aligntok.preflight import PreflightError, require_stage
    try:
        # every weight the stage loads, resolved before torchrun starts N processes (and again in each rank,
        # whose node may have a cache of its own): a missing one is this one line, not a failure after training
        require_stage(args.command, params)
        _maybe_torchrun(args.command, params)
    except ConfigError as e:
        print(f"aligntok: config error: {e}", file=sys.stderr)
        return 2
    except PreflightError as e:
        print(f"aligntok: {args.command}: preflight: {e}", file=sys.stderr)
        return 2
    except GpuUnavailable as e:
        print(f"aligntok: {e}", file=sys.stderr)
        return 1
    module = importlib.import_module(f"aligntok.stages.{STAGES.get(args.command, args.command)}")
    args.stage = args.command
    try:
        return module.run(params, args) or 0
    except ConfigError as e:
        print(f"aligntok: config error: {e}", file=sys.stderr)
        return 2
    except _known_errors() as e:  # bad input or a failed write: one line naming the file, no traceback
        print(f"aligntok: {args.command}: {e}", file=sys.stderr)
        return exit_code(e)


BAD_INPUT, DIVERGED, FAILED = 2, 3, 1  # exit codes; 2 and 3 are not worth a retry with the same params


def exit_code(e: BaseException) -> int:
    from aligntok.models.encoder import EncoderLoadError
    from aligntok.models.tokenizer import TokenizerLoadError
    from aligntok.train.loop import TrainingDiverged
    if isinstance(e, TrainingDiverged):
        return DIVERGED
    return BAD_INPUT if isinstance(e, (ValueError, EncoderLoadError, TokenizerLoadError)) else FAILED


def _known_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already says what went wrong and where; anything else keeps its traceback."""
    from aligntok.data.latents import LatentCacheError
    from aligntok.data.shards import DataError
    from aligntok.eval.judge import JudgeLoadError
    from aligntok.eval.metrics import MetricError
    from aligntok.eval.npz import NpzError
    from aligntok.models.dit_export import DitLoadError
    from aligntok.io import WriteError
    from aligntok.models.encoder import EncoderLoadError
    from aligntok.models.tokenizer import TokenizerLoadError
    from aligntok.train.checkpoint import CheckpointWriteError
    from aligntok.train.dist import SharedDirError
    from aligntok.train.loop import TrainingDiverged
    from aligntok.data.text_cache import TextCacheError
    from aligntok.eval.clip_score import ClipModelError
    from aligntok.eval.t2i import PromptError
    from aligntok.models.text_encoder import TextEncoderError
    return (DataError, LatentCacheError, NpzError, MetricError, TokenizerLoadError, EncoderLoadError, DitLoadError,
            JudgeLoadError, WriteError, CheckpointWriteError, TrainingDiverged, SharedDirError, TextEncoderError,
            TextCacheError, PromptError, ClipModelError)


def _preflight(params, params_path: Path) -> int:
    from aligntok.preflight import format_table, profile_checks
    checks = profile_checks(params, params_path, [*STAGES, "sample"])
    print(format_table(checks))
    failed = [c.name for c in checks if not c.ok]
    print(f"preflight: {len(checks) - len(failed)} of {len(checks)} checks pass"
          + (f"; fix: {', '.join(failed)}" if failed else ""))
    return 2 if failed else 0


def _switch_profile(name: str, target: Path) -> int:
    names = sorted(p.stem for p in Path("profiles").glob("*.yaml"))
    src = Path("profiles") / f"{name}.yaml"
    if name not in names:  # a name, not a path: `../x` must not reach outside profiles/
        avail = ", ".join(names) or "none"
        print(f"aligntok: config error: profile {name!r} not found in profiles/ (available: {avail})", file=sys.stderr)
        return 2
    load_params(src, check_paths=False)  # a broken profile must not replace a working params.yaml
    shutil.copyfile(src, target)
    print(f"{target} now holds profiles/{name}.yaml; run `dvc repro` (or `dvc exp run`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
