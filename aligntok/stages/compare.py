"""`aligntok compare`: pipeline runs side by side — the params that differ and the key metrics."""
from __future__ import annotations

import csv
import io
import sys

from aligntok.config import Params

KEY_METRICS = ["rfid", "psnr", "ssim", "lpips", "semantic_cosine", "gfid", "is", "precision", "recall",
               "gfid_cfg", "is_cfg", "precision_cfg", "recall_cfg"]


def compare_table(runs) -> tuple[list[str], list[list[str]]]:
    """Header and rows for pipeline (parent) runs that reached evaluate: name, differing params, key metrics.
    Interrupted pipelines (no metrics on the parent) are left out."""
    parents = [r for r in runs if r.data.tags.get("role") == "pipeline" and any(m in r.data.metrics for m in KEY_METRICS)]
    if not parents:
        return [], []
    keys = sorted({k for r in parents for k in r.data.params})
    differing = [k for k in keys if len({r.data.params.get(k) for r in parents}) > 1]
    metrics = [m for m in KEY_METRICS if any(m in r.data.metrics for r in parents)]
    header = ["run", *differing, *metrics]
    rows = []
    for r in sorted(parents, key=lambda r: r.info.start_time):
        name = r.info.run_name or r.data.tags.get("dvc_exp_name") or r.info.run_id[:8]  # a Prefect run's, a DVC exp's
        rows.append([name, *[r.data.params.get(k, "") for k in differing],
                     *[f"{r.data.metrics[m]:.4g}" if m in r.data.metrics else "" for m in metrics]])
    return header, rows


def render(header: list[str], rows: list[list[str]], fmt: str) -> str:
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf).writerows([header, *rows])
        return buf.getvalue()
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def run(params: Params, args) -> int:
    from aligntok.tracking import search_runs

    header, rows = compare_table(search_runs(params, args.experiment))
    if not rows:
        print(f"no pipeline runs in experiment {args.experiment or params.tracking.experiment!r}", file=sys.stderr)
        return 1
    sys.stdout.write(render(header, rows, args.format))
    return 0
