"""`aligntok bench ddp` from the CLI: real torchrun launches (gloo) of one and two processes at the same global
batch, each reporting its own world size and thread count."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # three torchrun launches: ~35 s on 2 cores


def test_bench_ddp_times_one_and_two_processes_at_the_same_global_batch(tmp_path):
    out = tmp_path / "ddp.json"
    proc = subprocess.run([sys.executable, "-m", "aligntok.cli", "bench", "ddp", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    cores = os.cpu_count()
    share = max(1, cores // 2)
    # what each launch saw from inside: its world size and torch's thread count
    assert [(row["processes"], row["threads_per_process"]) for row in r["rows"]] == [(1, cores), (1, share), (2, share)]
    for row in r["rows"]:
        assert row["global_batch"] == 8 and len(row["s_per_step"]) == 2 and all(t > 0 for t in row["s_per_step"])
        assert row["img_per_s"] == 8 / row["s_per_step_median"]
    assert r["speedup"] == r["rows"][2]["img_per_s"] / r["rows"][0]["img_per_s"]
    assert "1 -> 2 processes" in proc.stderr
