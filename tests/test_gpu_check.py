"""`make gpu-check` (aligntok.bench.gpu_check): its refusal without CUDA, its table, its row runner (time budget,
failures, skips) and a dry run of every row's code path at toy sizes on the CPU."""
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aligntok.bench.gpu_check import COLUMNS, Spec, markdown_table, run_rows
from tests.make_run import make

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def gpu_check(tmp_path: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout, from any working directory
    return subprocess.run([sys.executable, "-m", "aligntok.bench.gpu_check", "--out", str(tmp_path / "g.json"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_refuses_without_cuda_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here")
    proc = gpu_check(tmp_path)
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert len(said) == 1 and said[0].startswith("gpu-check: needs a CUDA GPU") and "--cpu-dry-run" in said[0], said
    assert not (tmp_path / "g.json").exists()


def test_make_gpu_check_is_one_command_in_the_given_python():
    def plan(*extra):
        return [line.strip() for line in make("-n", "gpu-check", *extra, check=True).stdout.splitlines()]
    assert plan("PY=/opt/env/bin/python") == [
        "/opt/env/bin/python -m aligntok.bench.gpu_check --out outputs/gpu_check.json"]
    assert plan("VENV=/nonexistent") == ["python3 -m aligntok.bench.gpu_check --out outputs/gpu_check.json"]
    assert plan("PY=python", "GPU_CHECK_ARGS=--rows dit") == [
        "python -m aligntok.bench.gpu_check --out outputs/gpu_check.json --rows dit"]


ROWS = [
    {"part": "dit train", "model": "LightningDiT-XL/1", "batch": 128, "options": "eager", "status": "ok",
     "img_per_s": 1234.56, "s_per_step": 0.10368, "peak_gib": 61.234, "row_s": 12.4},
    {"part": "dit train", "model": "LightningDiT-XL/1", "batch": 128, "options": "compile", "status": "ok",
     "img_per_s": 1500.0, "s_per_step": 0.08533, "peak_gib": 40.0, "recompiles": 0, "row_s": 51.6,
     "note": "warm-up compiled 2 graph(s) in 49 s"},
    {"part": "dit train", "model": "LightningDiT-XL/1", "batch": 256, "options": "eager", "status": "oom",
     "note": "out of memory", "peak_gib": 139.5, "row_s": 3.0},
    {"part": "dit train DDP", "model": "LightningDiT-XL/1", "batch": 128, "options": "1 GPU", "status": "skipped",
     "note": "1 GPU visible: DDP needs 2 or more (CUDA_VISIBLE_DEVICES)"},
    {"part": "FID Inception features", "model": "Inception-V3", "batch": 250, "options": "fp32", "status": "failed",
     "note": "FeatureWeightsError: a | b", "peak_gib": 0.0, "row_s": 0.2},
    {"part": "dit sample", "model": "tiny", "batch": None, "options": "eager", "status": "ok", "img_per_s": 0.04,
     "s_per_step": 2.5, "peak_gib": None, "row_s": 7.0},
]


def test_markdown_table_units_and_rows_that_did_not_run():
    lines = markdown_table(ROWS).splitlines()
    assert lines[0] == "| part | model | batch | options | img/s | ms/batch | peak GiB | recompiles | row s | notes |"
    assert lines[1] == "|---|---|---|---|---|---|---|---|---|---|"
    assert lines[2:] == [
        "| dit train | LightningDiT-XL/1 | 128 | eager | 1,234.6 | 103.7 | 61.23 |  | 12 |  |",
        "| dit train | LightningDiT-XL/1 | 128 | compile | 1,500.0 | 85.3 | 40.00 | 0 | 52 | "
        "warm-up compiled 2 graph(s) in 49 s |",
        "| dit train | LightningDiT-XL/1 | 256 | eager | n/a | n/a | 139.50 |  | 3 | OOM |",
        "| dit train DDP | LightningDiT-XL/1 | 128 | 1 GPU | n/a | n/a | n/a |  |  | "
        "skipped: 1 GPU visible: DDP needs 2 or more (CUDA_VISIBLE_DEVICES) |",
        "| FID Inception features | Inception-V3 | 250 | fp32 | n/a | n/a | 0.00 |  | 0 | "
        "failed: FeatureWeightsError: a \\| b |",
        "| dit sample | tiny |  | eager | 0.0 | 2,500.0 | n/a |  | 7 |  |",
    ]
    assert all(line.count(" | ") == len(COLUMNS) - 1 for line in lines[2:])  # the escaped | is not a column


def test_run_rows_budget_failures_skips_and_cleanup():
    calls, closed = [], []

    def row(name, seconds=0.0, fail=None):
        def run(deadline):
            calls.append(name)
            assert deadline > time.perf_counter()
            time.sleep(seconds)
            if fail:
                raise fail
            return {"img_per_s": 10.0, "s_per_step": 0.1, "timed_steps": 1}
        return run

    specs = [Spec("dit", "a", "m", 1, "eager", 0, row("a", 0.3), after=lambda: closed.append("a")),
             Spec("tokenizer", "b", "m", 1, "x", 0, row("b", fail=ValueError("bad shape\nsecond line"))),
             Spec("ddp", "c", "m", 2, "x", 0, row("c"), skip="1 GPU visible"),
             Spec("inception", "d", "m", 2, "x", 0, row("d")),
             Spec("compile", "e", "m", 2, "x", 60, row("e"), after=lambda: closed.append("e"))]
    seen = []
    rows = run_rows(specs, CPU, {"dit", "tokenizer", "ddp", "compile"}, budget_s=30, on_row=seen.append)
    assert calls == ["a", "b"] and closed == ["a", "e"] and seen == rows
    assert [r["status"] for r in rows] == ["ok", "failed", "skipped", "skipped", "skipped"]
    assert rows[0]["row_s"] >= 0.3 and rows[0]["peak_gib"] is None and rows[0]["img_per_s"] == 10.0
    assert rows[1]["note"] == "ValueError: bad shape"
    assert rows[2]["note"] == "1 GPU visible" and rows[3]["note"] == "not in --rows (inception)"
    assert re.fullmatch(r"time budget: \d+ s of --budget-s 30 left, the row takes ~60 s", rows[4]["note"])


@pytest.mark.slow
def test_cpu_dry_run_runs_every_row(tmp_path):
    """Every row's code path at toy sizes (compile and DDP included: about 2-6 min on 2 busy cores)."""
    proc = gpu_check(tmp_path, "--cpu-dry-run", "--budget-s", "3600", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "g.json").read_text())
    rows = result["rows"]
    assert result["mode"].startswith("cpu dry run") and len(rows) == 10
    assert {r["part"] for r in rows} == {"dit train", "dit sample", "tokenizer stage 2 train", "cache-latents encode",
                                         "evaluate sample + decode", "FID Inception features", "dit train DDP"}
    for r in rows:
        assert r["status"] == "ok", r
        assert math.isfinite(r["img_per_s"]) and r["img_per_s"] > 0 and r["s_per_step"] > 0, r
        assert r["peak_gib"] is None  # no CUDA memory counters on the CPU
    compiled = [r for r in rows if r["options"].startswith("compile")]
    assert len(compiled) == 2 and all(r["recompiles"] == 0 for r in compiled)
    ddp = next(r for r in rows if r["part"] == "dit train DDP")
    assert ddp["note"].startswith("gloo, 2 x 2 images") and ddp["one_process"]["processes"] == 1
    assert result["table"] in proc.stdout and len(result["table"].splitlines()) == 2 + len(rows)
