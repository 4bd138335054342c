"""`aligntok study-report`: the small-scale study (`make study`) from MLflow, as reports/study.md + PNG plots;
`--task text`: the text-to-image study (`make study-t2i`: variants a and d on t2i-smoke) as reports/study-t2i.md,
scored by the caption judge (caption_acc: every attribute of the prompt read back from the sample).

Variants, told apart by each run's logged params (so any run of the DAG can be placed):
  a  AlignTok, three stages          (default recipe)
  b  stage 1 only, frozen encoder    (tokenizer.stage2.steps = tokenizer.stage3.steps = 0)
  c  AlignTok without semantic pres. (tokenizer.stage2.semantic_weight = 0)
  d  from-scratch VAE baseline       (tokenizer.kind = vae)
Per pipeline (one per variant and seed) it reads the `evaluate` child run (rPSNR, semantic cosine, linear probe,
judge FD and class accuracy of samples, and its protocol.json: the profile, data set and models the numbers come
from) and the `train-dit` child run's probe history (the convergence curve).
The newest pipeline per (variant, seed) counts; a pipeline without both runs (interrupted) is left out.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from aligntok.config import Params

VARIANTS = {"a": "AlignTok (3 stages)", "b": "stage 1 only (frozen encoder)", "c": "AlignTok, no semantic preservation",
            "d": "from-scratch VAE"}
SCALARS = [("psnr", "rPSNR (dB)"), ("semantic_cosine", "semantic cosine"), ("linear_probe_acc", "linear probe acc"),
           ("fd_judge", "judge FD"), ("class_acc_judge", "judge class acc"),
           ("fd_judge_cfg", "judge FD, CFG"), ("class_acc_judge_cfg", "judge class acc, CFG")]
CURVES = [("probe_fd", "judge FD of samples (lower is better)"), ("probe_class_acc", "judge class accuracy of samples")]
TEXT_SCALARS = [("psnr", "rPSNR (dB)"), ("linear_probe_acc", "linear probe acc (shape)"),
                ("caption_acc_judge", "caption acc"), ("caption_acc_judge_cfg", "caption acc, CFG"),
                ("attr_acc_position_judge_cfg", "position acc, CFG"), ("attr_acc_colour_judge_cfg", "colour acc, CFG"),
                ("gfid_cfg", "FD vs prompt images, CFG")]
TEXT_CURVES = [("probe_caption_acc", "caption judge: whole-caption accuracy of samples"),
               ("probe_attr_acc_position", "caption judge: position accuracy of samples")]
# task -> (report file, title, scalars, curves, what the judge is)
STUDIES = {
    "class": ("study.md", "Small-scale study: is an aligned semantic encoder's latent space easier for a DiT?",
              SCALARS, CURVES, "Judge metrics use the independent judge classifier (aligntok/eval/judge.py), not the "
              "tokenizer's encoder."),
    "text": ("study-t2i.md", "Small-scale text-to-image study: AlignTok against a from-scratch VAE",
             TEXT_SCALARS, TEXT_CURVES, "Caption metrics use the caption judge (aligntok/eval/caption_judge.py), "
             "trained on held-out scenes: caption acc = every attribute of the prompt right (chance 1/384 = 0.0026), "
             "position acc = the named half right (chance 0.25). The CFG rows use eval.cfg_scale."),
}


def variant_of(p: dict[str, str]) -> str:
    if p.get("tokenizer.kind") == "vae":
        return "d"
    if p.get("tokenizer.stage2.steps") == "0" and p.get("tokenizer.stage3.steps") == "0":
        return "b"
    if float(p.get("tokenizer.stage2.semantic_weight", "1")) == 0:
        return "c"
    return "a"


def stepped(points) -> list[tuple[int, float]]:
    """[(step, value)] of an MLflow metric history (objects with step, value, timestamp), without the points logged
    with no step. MLflow stores those at step 0, where a curve would read them as the untrained model's score (until
    issue 22, train-dit logged its last probe again that way, after training). A step-0 point is kept only when it
    was logged before every point of a later step, as the baseline probe of the untrained model is."""
    later = [m.timestamp for m in points if m.step > 0]
    return sorted((m.step, m.value) for m in points if m.step > 0 or (later and m.timestamp < min(later)))


def collect(runs, history, protocol=lambda run_id: {}, curves=CURVES) -> dict[tuple[str, str], dict]:
    """{(variant, seed): {"metrics": {...}, "curves": {name: [(step, value)]}, "protocol": {...}, "start": ms,
    "end": ms}}. `history(run_id, key)` returns [(step, value)] (MLflow's metric history), `protocol(run_id)` the
    evaluate run's protocol.json ({} when it has none)."""
    by_pipeline: dict[str, dict] = defaultdict(dict)
    first: dict[str, int] = {}  # each pipeline's first run start (its parent run, or prepare)
    for r in runs:
        stage, pid = r.data.tags.get("stage"), r.data.tags.get("pipeline_id")
        if pid:
            first[pid] = min(first.get(pid, r.info.start_time), r.info.start_time)
        if stage in ("evaluate", "train-dit") and pid and r.info.status == "FINISHED":
            by_pipeline[pid][stage] = r
    out: dict[tuple[str, str], dict] = {}
    for pid, stages in by_pipeline.items():
        if len(stages) < 2:
            continue
        ev, dit = stages["evaluate"], stages["train-dit"]
        key = (variant_of(ev.data.params), ev.data.params.get("seed", "?"))
        entry = {"metrics": dict(ev.data.metrics), "curves": {name: history(dit.info.run_id, name) for name, _ in curves},
                 "protocol": protocol(ev.info.run_id), "start": first[pid],
                 "end": ev.info.end_time or ev.info.start_time, "pipeline": pid,
                 "commit": ev.data.tags.get("mlflow.source.git.commit", "unknown")}
        if key not in out or out[key]["end"] < entry["end"]:
            out[key] = entry
    return out


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3g} ± {sd:.2g}"


def summarise(found: dict, scalars=SCALARS, curve_keys=CURVES) -> tuple[list[str], dict]:
    """Markdown table lines (mean ± sd over seeds, n seeds) and per-variant mean curves {variant: {name: [(s, m, sd)]}}."""
    rows = ["| variant | seeds | " + " | ".join(label for _, label in scalars) + " |",
            "| --- | ---: |" + " ---: |" * len(scalars)]
    curves: dict = {}
    for v, name in VARIANTS.items():
        entries = [e for (var, _), e in sorted(found.items()) if var == v]
        if not entries:
            continue
        cells = [_mean_sd([e["metrics"][k] for e in entries if k in e["metrics"]]) for k, _ in scalars]
        rows.append(f"| ({v}) {name} | {len(entries)} | " + " | ".join(cells) + " |")
        curves[v] = {}
        for key, _ in curve_keys:
            steps = sorted({s for e in entries for s, _ in e["curves"][key]})
            points = []
            for s in steps:
                vals = [val for e in entries for st, val in e["curves"][key] if st == s]
                points.append((s, statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0))
            curves[v][key] = points
    return rows, curves


def plot(curves: dict, out_dir: Path, curve_keys=CURVES) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt
    paths = []
    for key, label in curve_keys:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for v, per in curves.items():
            pts = per.get(key) or []
            if pts:
                s, m, sd = zip(*pts)
                ax.errorbar(s, m, yerr=sd, marker="o", capsize=3, label=f"({v}) {VARIANTS[v]}")
        ax.set_xlabel("DiT training steps")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"study_{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def provenance(found: dict) -> list[str]:
    """One line per profile the pipelines ran under, from their own protocol (not the current params.yaml)."""
    seen = sorted({tuple(e.get("protocol", {}).get(k, "unknown") for k in ("profile", "data", "models", "fid_backbone"))
                   for e in found.values()})
    lines = [f"Profile **{p}**: data {d}; {m}; FID-type metrics in {b} feature space." for p, d, m, b in seen]
    if len({p for p, *_ in seen}) > 1:
        lines.append("**These pipelines ran under different profiles: their numbers are not comparable.**")
    return lines


def report(found: dict, out_dir: Path, command: str, commit: str | None, task: str = "class") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    name, title, scalars, curve_keys, judge_note = STUDIES[task]
    rows, curves = summarise(found, scalars, curve_keys)
    plots = plot(curves, out_dir, curve_keys)
    starts, ends = [e["start"] for e in found.values()], [e["end"] for e in found.values()]
    wall = (max(ends) - min(starts)) / 60000 if found else 0.0
    lines = [f"# {title}", "",
             f"Made by `{command}`: {len(found)} pipelines at commit "
             f"{', '.join(f'`{c}`' for c in sorted({e['commit'] for e in found.values()}))} (read from their MLflow "
             f"runs), first stage start to last evaluate end: {wall:.1f} min. Report written on "
             f"{time.strftime('%Y-%m-%d')} at commit `{commit or 'unknown'}`.", "", *provenance(found), "",
             f"Every number is a mean ± standard deviation over seeds, read from MLflow. {judge_note}", "",
             *rows, "", "## Convergence (diffusability probe during DiT training, no CFG)", "",
             *[f"![{p.stem}]({p.name})" for p in plots], ""]
    path = out_dir / name
    path.write_text("\n".join(lines))
    return path


def run(params: Params, args) -> int:
    import mlflow

    from aligntok.tracking import search_runs
    from aligntok.tracking.uri import source_commit, tracking_uri

    client = mlflow.MlflowClient(tracking_uri(params))

    def history(run_id: str, key: str):
        return stepped(client.get_metric_history(run_id, key))

    def protocol(run_id: str) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                return json.loads(Path(client.download_artifacts(run_id, "protocol.json", tmp)).read_text())
            except Exception:  # noqa: BLE001 - a run logged before protocols were (or whose upload failed)
                return {}

    task = getattr(args, "task", None) or "class"
    found = collect(search_runs(params, args.experiment), history, protocol, STUDIES[task][3])
    if not found:
        print(f"study-report: no finished evaluate + train-dit pipelines in experiment "
              f"{args.experiment or params.tracking.experiment!r}")
        return 1
    path = report(found, Path(args.out), args.command_line, source_commit(), task)
    print(f"study-report: {len(found)} pipelines -> {path}")
    return 0
