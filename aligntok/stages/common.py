"""Paths and bookkeeping every stage shares (names agreed in shared/design.md)."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from aligntok.config import Params
from aligntok.io import write_bytes_atomic, write_json_atomic
from aligntok.tracking.keys import final_metric_keys

OUTPUTS = Path("outputs")
CHECKPOINTS = Path("checkpoints")


def data_dir(params: Params) -> Path:
    return Path("data") / params.data.name


def tokenizer_dir(stage: int) -> Path:
    return OUTPUTS / "tokenizer" / f"stage{stage}" / "model"


LATENTS_DIR = OUTPUTS / "latents"
DIT_DIR = OUTPUTS / "dit" / "model"
REFERENCE_DIR = OUTPUTS / "reference"
JUDGE_DIR = OUTPUTS / "judge"
TEXT_DIR = OUTPUTS / "text"  # cache-text: the train captions' encoder states


def provenance(params: Params) -> dict[str, str]:
    """The profile, data set and models behind a stage's numbers, for its protocol block: reports read them from
    there, not from the current params.yaml (which may have been switched since)."""
    d, tok = params.data, params.tokenizer
    source = {"synthetic": "synthetic shapes", "scenes": "captioned synthetic scenes"}.get(d.source,
                                                                                         f"{d.source} {d.root}")
    labels = f"{d.num_classes} classes" if params.task == "class" else "captioned"
    tokenizer = f"external {tok.external}" if tok.kind == "external" else f"{tok.kind} {tok.size}"
    out = {"profile": params.profile, "task": params.task,
           "data": f"{d.name}: {source}, {d.resolution} px, {labels}, "
                   f"{'all' if d.num_images is None else d.num_images} images",
           "models": f"encoder {params.encoder.arch}, tokenizer {tokenizer}, DiT {params.dit.model}"}
    if params.task == "text":
        out["text_encoder"] = f"{params.text.encoder} (last hidden states, {params.text.max_tokens} tokens)"
    return out


def metrics_path(stage: str) -> Path:
    return OUTPUTS / "metrics" / f"{stage}.json"


def protocol_path(stage: str) -> Path:
    """Where a stage's non-numeric facts go: not a DVC metric, so `dvc exp show` keeps only comparable columns."""
    return OUTPUTS / "protocol" / f"{stage}.json"


def split_numbers(d: dict) -> tuple[dict, dict]:
    """(numbers, the rest) of a nested dict, each keeping the nesting. Bools and None are not numbers: DVC would
    show them as columns that cannot be diffed."""
    numbers, rest = {}, {}
    for k, v in d.items():
        if isinstance(v, dict):
            n, r = split_numbers(v)
            if n:
                numbers[k] = n
            if r:
                rest[k] = r
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            numbers[k] = v
        else:
            rest[k] = v
    return numbers, rest


def write_metrics(stage: str, metrics: dict, tracker=None, step: int | None = None, path: Path | None = None) -> Path:
    """The stage's DVC metrics file, numbers only, with strings (labels, backbones, hashes) in protocol_path(stage);
    always written, so a tracking outage loses nothing; its top-level numbers go to MLflow, under the keys
    `final_metric_keys` gives (a tokenizer stage's as val_<name>, off its training curves). An explicit `path`
    (a one-off outside the DAG) gets everything in one file."""
    numbers, rest = split_numbers(metrics)
    if path is not None:
        write_json_atomic(path, metrics)
    else:
        path = metrics_path(stage)
        write_json_atomic(path, numbers)
        write_json_atomic(protocol_path(stage), rest)
    if tracker is not None:
        top = {k: v for k, v in numbers.items() if not isinstance(v, dict)}
        tracker.log_metrics(final_metric_keys(stage, top), step=step)
    return path


def write_plots(stage: str, history: list[dict]) -> Path:
    """Loss curves as CSV for `dvc plots` (one row per logged step)."""
    path = OUTPUTS / "plots" / f"{stage}.csv"
    keys = sorted({k for row in history for k in row} - {"step"})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", *keys], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    write_bytes_atomic(path, buf.getvalue().encode())
    return path


def feature_extractor(params: Params):
    """The FID/IS/PR feature extractor of `params.eval` (shared by the tokenizer stages and evaluate)."""
    from aligntok.eval.features import build_feature_extractor
    e = params.eval
    return build_feature_extractor(e.fid_backbone, e.inception_weights, seed=params.seed, feature_dim=e.feature_dim)
