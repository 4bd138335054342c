"""`aligntok bench t2i-dit | text-cache | webdataset` through the CLI with tiny settings: the JSON's fields are there
and every figure is positive and finite. No timing is asserted (a shared CPU makes any bound flaky); the FLOP
counts are deterministic, so the text DiT's extra FLOPs are."""
from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys

import pytest

from aligntok.stages.bench import BenchUnavailable, run_bench


def _bench(tmp_path, *args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "aligntok.cli", "bench", *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_t2i_dit(tmp_path):
    proc, result = _bench(tmp_path, "t2i-dit", "--quick", "--caption-len", "8", "--text-dim", "16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["target"] == "t2i-dit" and json.loads(proc.stdout) == result
    assert (result["caption_len"], result["text_dim"]) == (8, 16)
    (row,) = result["rows"]
    assert row["model"] == "tiny/2" and row["batch"] == 2 and (row["caption_len"], row["text_dim"]) == (8, 16)
    for key in ("t2i_img_per_s", "class_img_per_s", "t2i_s_per_step", "class_s_per_step", "t2i_flop_per_step",
                "class_flop_per_step", "t2i_achieved_flop_s", "class_achieved_flop_s", "t2i_params_M",
                "class_params_M"):
        assert _positive(row[key]), (key, row[key])
    assert all(_positive(row["time_ratio"][k]) for k in ("median", "min", "max"))
    assert row["flop_ratio"] > 1 and row["t2i_params_M"] > row["class_params_M"]  # the caption stream costs
    assert "time ratio" in proc.stderr and "tiny/2 | 2 |" in proc.stderr  # the table


def _has(module: str, name: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def test_text_cache(tmp_path):
    proc, result = _bench(tmp_path, "text-cache", "--quick", "--captions", "16", "--caption-len", "8")
    if not (_has("aligntok.bench.text", "bench_text_cache") or _has("aligntok.stages.text", "bench_text_cache")):
        assert proc.returncode == 1 and result is None
        assert proc.stdout.count("\n") == 1 and "bench_text_cache is not in this checkout" in proc.stdout
        return
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["target"] == "text-cache" and result["encoder"] == "all-MiniLM-L6-v2"
    assert (result["captions"], result["max_tokens"]) == (16, 8)
    assert _positive(result["captions_per_s"])


def test_webdataset(tmp_path):
    proc, result = _bench(tmp_path, "webdataset", "--quick", "--workers", "1,2", "--images", "12",
                          "--resolution", "16")
    if not _has("aligntok.bench.webdataset", "bench_webdataset"):
        assert proc.returncode == 1 and "bench_webdataset is not in this checkout" in proc.stdout
        return
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["target"] == "webdataset" and [r["workers"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["images"] == 12 and row["resolution"] == 16
        assert _positive(row["img_per_s"]) and _positive(row["seconds"])


def test_options_of_another_target_or_out_of_range_are_one_line(capsys):
    """As the CLI passes them (an option not given is None); run in-process, without the CLI's signal handler."""
    assert run_bench("t2i-dit", None, workers="2", images=None) == 2
    assert capsys.readouterr().out == "aligntok bench t2i-dit: --workers applies to `bench webdataset` only\n"
    assert run_bench("dit", None, caption_len=8) == 2
    assert "--caption-len applies to `bench t2i-dit` and `bench text-cache` only" in capsys.readouterr().out
    assert run_bench("webdataset", None, True, workers="1,x") == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "--workers: given 'x'; expected a positive integer" in out


def test_a_missing_bench_is_one_line(monkeypatch):
    from aligntok.bench import t2i
    monkeypatch.setitem(sys.modules, "aligntok.bench.webdataset", None)  # import of it now fails
    with pytest.raises(BenchUnavailable) as err:
        t2i.run_webdataset(quick=True)
    text = str(err.value)
    assert "\n" not in text and "bench_webdataset" in text and "aligntok/bench/webdataset.py" in text
