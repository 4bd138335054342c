"""`aligntok summary`: what the last DAG run produced, in one screen (the end of `make demo`).

Every number is printed beside the protocol it was measured under (profile, data set, backbone, sample count,
reference), read from outputs/protocol/evaluate.json, so a number is never shown without what makes it comparable.
Nothing comes from the current params.yaml but where MLflow is: it may have been switched since the run.
"""
from __future__ import annotations

import json

from aligntok.config import Params
from aligntok.stages.common import OUTPUTS, metrics_path, protocol_path


def _labels(p: dict) -> dict[str, str]:
    own = " (own statistics: not comparable with published numbers)" if p.get("reference_choice") == "own" else ""
    gen = (f"{p.get('fid_backbone')}-{p.get('feature_dim')}, {p.get('num_samples')} samples, {p.get('labels')} labels, "
           f"{p.get('sampler')} {p.get('steps')} steps, vs {p.get('reference')}{own}")
    recon = f"{p.get('recon_images')} val images ({p.get('recon_source')})"
    return {"gfid": f"FD in {gen}", "is": f"{p.get('fid_backbone')} classifier logits, {p.get('num_samples')} samples",
            "precision": f"k=3 in {p.get('fid_backbone')} space", "recall": f"k=3 in {p.get('fid_backbone')} space",
            "fd_judge": f"{p.get('judge_backbone')}", "class_acc_judge": "judge's argmax == the sample's class",
            "precision_judge": f"k=3 in {p.get('judge_backbone')}", "recall_judge": f"k=3 in {p.get('judge_backbone')}",
            "psnr": f"dB, {recon}", "ssim": recon, "lpips": f"{p.get('lpips_backbone')} trunk, {recon}",
            "rfid": f"{p.get('fid_backbone')}, {recon} vs their reconstructions",
            "semantic_cosine": f"final vs stage-1 latents, {recon}", "linear_probe_acc": f"{p.get('linear_probe')}",
            **(_text_labels(p) if p.get("task") == "text" else {})}


def _text_labels(p: dict) -> dict[str, str]:
    """The text task's rows: the prompt set instead of class labels, the caption judge, CLIP score."""
    gen = (f"{p.get('fid_backbone')}-{p.get('feature_dim')}, {p.get('num_samples')} samples for "
           f"{p.get('prompts')}, {p.get('sampler')} {p.get('steps')} steps, vs {p.get('reference')}")
    from aligntok.data.scenes import ATTRIBUTES
    out = {"gfid": f"FD in {gen}", "caption_acc_judge": "caption judge: every attribute of the prompt read back"}
    out.update({f"attr_acc_{a}_judge": f"caption judge: the {a} named in the prompt" for a in ATTRIBUTES})
    out["clip_score"] = f"{p.get('clip_score')}"
    if str(p.get("clip_score", "")).startswith("not measured"):
        out["clip_score"] = f"n/a {p.get('clip_score')}"
    return out


def table(metrics: dict, protocol: dict) -> list[str]:
    labels = _labels(protocol)
    cfg = protocol.get("cfg_scale")
    rows = ["| metric | value | protocol |", "| --- | ---: | --- |"]
    for key, label in labels.items():
        for suffix, note in (("", ""), ("_cfg", f", CFG {cfg:g}" if isinstance(cfg, (int, float)) else "")):
            chance = metrics.get(f"{key.removesuffix('_judge')}_chance")
            if isinstance(metrics.get(f"{key}{suffix}"), (int, float)):
                said = f"{label}{note}" + (f"; chance {chance:.4g}" if isinstance(chance, (int, float)) else "")
                rows.append(f"| {key}{suffix} | {metrics[key + suffix]:.4g} | {said} |")
            elif not suffix and label.startswith("n/a"):
                rows.append(f"| {key} | n/a | {label[4:].strip()} |")
    return rows


def run(params: Params, args) -> int:
    from aligntok.tracking import redact, run_url, ui_command

    path = metrics_path("evaluate")
    if not path.is_file():
        print(f"aligntok summary: {path} not found; run `aligntok repro` (or `dvc repro`) first")
        return 2
    metrics = json.loads(path.read_text())
    # the protocol's numbers (sample count, feature dim) sit in the metrics file, its strings in the protocol file
    protocol = {**metrics.get("protocol", {}), **json.loads(protocol_path("evaluate").read_text()).get("protocol", {})}
    judge = metrics_path("judge")
    print(f"\n## aligntok: results of profile '{protocol.get('profile', 'unknown: outputs older than this field')}'\n")
    print(f"data: {protocol.get('data')}; models: {protocol.get('models')}\n")
    print("\n".join(table(metrics, protocol)))
    if judge.is_file() and "heldout_accuracy" in (j := json.loads(judge.read_text())):
        print(f"\njudge: {j['heldout_accuracy']:.1%} on its held-out test images (chance {j['chance']:.1%})")
    elif judge.is_file() and "heldout_caption_acc" in j:
        print(f"\ncaption judge: {j['heldout_caption_acc']:.1%} of held-out scenes read back whole "
              f"(chance {j['chance_caption_acc']:.2%})")
    grids = [OUTPUTS / "eval" / n for n in ("samples.png", "samples_cfg.png", "reconstructions.png")]
    each = " (each sample with its prompt above it)" if protocol.get("task") == "text" else ""
    print(f"\nimages{each}: " + ", ".join(str(g) for g in grids if g.is_file()))
    try:
        page = redact(run_url(params))
    except Exception:  # noqa: BLE001 - no experiment yet, or the server is away: the command still helps
        page = ""
    print(f"MLflow: {ui_command(params)}  (experiment '{params.tracking.experiment}'{', ' + page if page else ''})")
    return 0
