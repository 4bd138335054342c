"""`aligntok evaluate`: gFID, IS, precision/recall (with and without CFG) and the tokenizer's rFID/PSNR/SSIM/LPIPS.

Every number is written with its protocol (sample count, labels, sampler, steps, CFG, reference set and whether its
FID statistics were stored or recomputed, backbone) so two numbers are compared only when their protocols match.
The number of ranks is not part of the protocol: the numbers do not depend on it. What a sample costs is reported
beside them instead (`sample_s_per_image`: seconds per sample on one rank, so N samples on R ranks take about
N x that / R) with this run's bookkeeping under `run`.

Under torchrun (launcher.nproc_per_node > 1) ranks split the sample parts (`aligntok.eval.parts`: resumable,
kept under checkpoints/evaluate for the current DiT), the reference statistics (`aligntok.eval.reference`) and the
tokenizer's val images (`aligntok.eval.reconstruction`); each rank samples, reconstructs and extracts features on its
own device; rank 0 scores.
"""
from __future__ import annotations

import time
from pathlib import Path

from aligntok.config import OWN_REFERENCE, Params
from aligntok.stages.common import (CHECKPOINTS, DIT_DIR, JUDGE_DIR, OUTPUTS, REFERENCE_DIR, data_dir,
                                    feature_extractor, provenance, tokenizer_dir, write_metrics)
from aligntok.train.dist import cleanup, init_distributed
from aligntok.tracking import log_final_metrics_to_parent, stage_run

EVAL_DIR = OUTPUTS / "eval"
PARTS_DIR = CHECKPOINTS / "evaluate"
REFERENCE_STATS = {"stored": "stored mu/sigma of the reference file (ADM protocol)",
                   "recomputed": "mu/sigma recomputed from the reference file's arr_0 features",
                   "train-split": "mu/sigma of every image of the prepared train split",
                   "val-split": "mu/sigma of every image of the prepared val split (the prompt set's images)",
                   "prompt-images": "mu/sigma of the prompt set's reference images (text.prompt_images)"}


def reference(params: Params, path: str | None, extractor, coord) -> dict | None:
    """The reference on rank 0 (None elsewhere). A reference file is checked by every rank before any sampling,
    so a bad file stops the run at once with one line."""
    from aligntok.data.dataset import loader_workers
    from aligntok.eval.reference import file_reference, train_reference, uses_stored_stats

    e = params.eval
    if path and path != OWN_REFERENCE:
        uses_stored_stats(path, extractor)
        return file_reference(path, extractor, REFERENCE_DIR, e.batch_size) if coord.is_main else None
    workers = loader_workers(params.data.num_workers, params.launcher.nproc_per_node)
    return train_reference(extractor, coord, data_dir(params), REFERENCE_DIR, f"{params.data.name}-train",
                           batch_size=e.batch_size, num_workers=workers)


def judge_protocol(params: Params) -> str | None:
    if params.judge.source != "synthetic":
        return None
    if params.task == "text":
        return ("caption judge CNN, one head per scene attribute, trained on held-out scenes: caption_acc = every "
                "attribute of the prompt read back from the sample, attr_acc_<attribute> = that attribute; "
                "<metric>_chance = a uniform random guess")
    return ("judge CNN, 128-d, trained on held-out synthetic images; FD and P/R vs its "
            f"{params.judge.test_images} held-out test images")


def protocol_of(params: Params, extractor, ref: dict | None) -> dict:
    e, s = params.eval, params.sample
    protocol = {**provenance(params), "fid_backbone": extractor.name, "feature_dim": extractor.dim,
                "reference": None, "reference_choice": None, "reference_stats": None, "num_samples": e.num_samples,
                "labels": e.labels, "sampler": s.method, "steps": s.steps, "cfg_scale": e.cfg_scale,
                "cfg_channels": s.cfg_channels, "cfg_interval_start": s.cfg_interval_start,
                "timestep_shift": s.timestep_shift, "sample_seed": s.seed,
                "precision_recall": "all samples vs the reference batch, k=3",
                "lpips_backbone": "pretrained" if params.lpips.pretrained_backbone else "random",
                "judge_backbone": judge_protocol(params)}
    if ref is not None:
        protocol["reference"] = f"{ref['name']} ({ref['count']} images)"
        # own statistics are a labelled choice: no published number is measured against them
        protocol["reference_choice"] = {"train-split": OWN_REFERENCE, "val-split": "prompt set",
                                        "prompt-images": "prompt set"}.get(ref["stats"], "file")
        protocol["reference_stats"] = REFERENCE_STATS[ref["stats"]]
        protocol["pr_reference_images"] = len(ref["features"])
    return protocol


def text_protocol(params: Params, source: str, count: int) -> dict:
    """The text task's part of the protocol: the prompt set, how samples map to prompts, and CLIP score's status."""
    clip = (f"{params.text.clip_model}: 100 * max(cos(image, caption), 0), mean over samples" if params.text.clip_model
            else "not measured: text.clip_model is null")
    return {"prompts": source, "num_prompts": count, "labels": "sample i is drawn for prompt i mod num_prompts",
            "text_encoder": params.text.encoder, "clip_score": clip}


def sample_and_score(params: Params, dist, coord, extractor, ref: dict | None, judge: tuple | None,
                     tracker, protocol: dict) -> tuple[dict, dict]:
    """Samples every variant's parts over all ranks, then (rank 0) scores them, with the judge too (`load_judge`'s
    result; None: off): (metrics, run bookkeeping). Text task: for the prompt set, with the caption judge."""
    from aligntok.data.shards import read_manifest
    from aligntok.eval.parts import PartStore, Variant, run_parts, sample_key, split_parts
    from aligntok.eval.scores import score_parts
    from aligntok.generate import labelled_grid, load_generator

    e = params.eval
    gen = load_generator(DIT_DIR, tokenizer_dir(3), dist.device)
    prompts = None
    if gen.is_text:
        from aligntok.eval.t2i import attach_prompts
        prompts, source = attach_prompts(gen, params, data_dir(params), e.num_samples)
        protocol.update(text_protocol(params, source, len(prompts)))
    store = PartStore(PARTS_DIR, sample_key(gen, params, dist.device), gen.num_conditions,
                      "balanced" if gen.is_text else e.labels, params.sample.seed)
    variants = [Variant("", 1.0)] + ([Variant("_cfg", e.cfg_scale)] if e.cfg_scale > 1 else [])
    parts = {v: split_parts(v, e.num_samples, e.batch_size) for v in variants}
    generated = run_parts(store, [p for v in variants for p in parts[v]], coord, gen, params.sample, extractor, e.amp)
    if not coord.is_main:
        return {}, {}
    metrics: dict = {}
    names = prompts or read_manifest(data_dir(params))["class_names"]
    for v in variants:
        out = score_parts(store, parts[v], extractor.tag, ref, dist.device, EVAL_DIR / f"samples{v.suffix}.npz")
        metrics.update({f"{k}{v.suffix}": x for k, x in out["metrics"].items()})
        metrics[f"sample_s_per_image{v.suffix}"] = out["seconds"] / out["n"]
        npz = EVAL_DIR / f"samples{v.suffix}.npz"
        scores = judged(judge, npz) if prompts is None else text_scores(params, judge, npz, prompts, dist.device)
        metrics.update({f"{k}{v.suffix}": x for k, x in scores.items()})
        grid = labelled_grid(out["grid"], out["grid_labels"].tolist(), names, cols=10, wrap=prompts is not None)
        grid.save(EVAL_DIR / f"samples{v.suffix}.png")
        tracker.log_artifact(EVAL_DIR / f"samples{v.suffix}.png", "samples")
    removed = store.prune_other_keys()
    run = {"sample_parts": str(store.dir), "generated": generated,
           "reused": {v.suffix: e.num_samples - generated[v.suffix] for v in variants}, "pruned_keys": removed}
    return metrics, run


def judged(judge: tuple | None, npz: Path) -> dict:
    """Class accuracy and fd_judge of a sample file by the independent judge (`load_judge`'s result; None: off).
    Synthetic data only: the file is read whole, which the small synthetic sample sets allow."""
    if judge is None:
        return {}
    from aligntok.eval.features import nhwc_to_nchw
    from aligntok.eval.judge import judge_metrics
    from aligntok.eval.npz import load_npz_samples
    images, labels = load_npz_samples(npz)
    return judge_metrics(judge, nhwc_to_nchw(images), labels)


def text_scores(params: Params, judge, npz: Path, prompts: list[str], device) -> dict:
    """The caption judge's scores (when there is one) and CLIP score (when a CLIP model is configured)."""
    from aligntok.eval.npz import load_npz_samples
    if judge is None and not params.text.clip_model:
        return {}
    images, prompt_ids = load_npz_samples(npz)
    out = {}
    if judge is not None:
        from aligntok.eval.t2i import caption_judged
        out.update(caption_judged(judge, images, prompt_ids, prompts))
    if params.text.clip_model:
        from aligntok.eval.clip_score import clip_score
        out["clip_score"] = clip_score(params.text.clip_model, images, [prompts[int(i)] for i in prompt_ids], device)
    return out


def external_samples(path: str, extractor, ref: dict, device, batch_size: int) -> tuple[dict, dict]:
    from aligntok.eval.features import extract
    from aligntok.eval.npz import load_npz_samples
    from aligntok.eval.scores import generation_metrics

    images, _ = load_npz_samples(path)
    feats, logits = extract(extractor, images, batch_size=batch_size)
    # how the external samples were made is not ours to report
    protocol = {"samples": str(path), "num_samples": len(images), "sampler": "external", "labels": None,
                "steps": None, "cfg_scale": None, "cfg_channels": None, "cfg_interval_start": None,
                "timestep_shift": None, "sample_seed": None}
    return generation_metrics(feats, logits, ref, device), protocol


def recon_grid(tokenizer, dataset, device, n: int = 10):
    """The first n val images (top row) over their reconstructions by the final tokenizer (bottom row)."""
    import numpy as np
    import torch
    from PIL import Image

    from aligntok.generate import to_uint8_nhwc
    k = min(n, len(dataset))
    # one batch: a ShardDataset reads each row group it touches once
    x, _ = next(iter(torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(k)), batch_size=k)))
    x = x.to(device)
    with torch.no_grad():
        rec = tokenizer.decode(tokenizer.encode(x)).float().clamp(-1, 1)
    rows = [np.concatenate(list(to_uint8_nhwc(t)), axis=1) for t in (x, rec)]
    return Image.fromarray(np.concatenate(rows, axis=0))


def recon_metrics(params: Params, extractor, device, coord) -> dict | None:
    """The final tokenizer's reconstruction numbers and linear probe, each rank measuring and encoding its share of
    the images; on rank 0 with the reconstruction grid (None elsewhere)."""
    from aligntok.data.dataset import ShardDataset, loader_workers
    from aligntok.eval.probe import linear_probe
    from aligntok.stages.tokenizer import load_tokenizer, measure

    tokenizer = load_tokenizer(3, device)
    workers = loader_workers(params.data.num_workers, params.launcher.nproc_per_node)
    out = measure(params, tokenizer, 3, device, coord, workers, extractor=extractor)
    train, val = (ShardDataset(data_dir(params), split) for split in ("train", "val"))
    probe = linear_probe(tokenizer, train, val, train.num_classes, device, per_class=params.eval.probe_per_class,
                         seed=params.seed, coord=coord, num_workers=workers)
    if not coord.is_main:
        return None
    recon_grid(tokenizer, val, device).save(EVAL_DIR / "reconstructions.png")
    return {**out, **probe}


def evaluate(params: Params, args, dist) -> int:
    from aligntok.eval.coord import Coord
    from aligntok.eval.npz import check_images_npz

    t0 = time.perf_counter()
    coord = Coord(dist.rank, dist.world_size)
    if args.samples:  # a bad file fails now, not after the reference statistics
        check_images_npz(args.samples)
    else:  # so do a DiT that does not fit the tokenizer's latents (weights not loaded yet) and a missing judge
        from aligntok.eval.judge import load_judge
        from aligntok.models.dit_export import check_dit
        text = check_dit(DIT_DIR, tokenizer_dir(3)).get("task", "class") == "text"
        if params.judge.source == "none":
            judge = None
        elif text:
            from aligntok.eval.caption_judge import load_caption_judge
            judge = load_caption_judge(JUDGE_DIR)
        else:
            judge = load_judge(JUDGE_DIR)
    extractor = feature_extractor(params).to(dist.device)
    if params.task == "text" and not (args.samples or args.reference):
        from aligntok.eval.t2i import prompt_reference
        ref = prompt_reference(params, data_dir(params), extractor, coord, REFERENCE_DIR, params.eval.num_samples)
    else:
        ref = reference(params, args.reference or params.eval.reference, extractor, coord)
    protocol = protocol_of(params, extractor, ref)
    EVAL_DIR.mkdir(parents=True, exist_ok=True)
    run: dict = {}
    with stage_run(params, "evaluate") as tracker:
        if args.samples:
            metrics, external = (external_samples(args.samples, extractor, ref, dist.device, params.eval.batch_size)
                                 if coord.is_main else ({}, {}))
            protocol.update(external)
        else:
            metrics, run = sample_and_score(params, dist, coord, extractor, ref, judge, tracker, protocol)
            if judge is not None and params.task == "text":
                from aligntok.eval.t2i import chance_levels
                metrics.update(chance_levels())
        recon = recon_metrics(params, extractor, dist.device, coord)
        if not coord.is_main:
            return 0
        protocol["recon_images"] = recon.pop("num_images")
        d = params.data
        protocol["recon_source"] = (f"data.val_root {d.val_root}" if d.val_root else
                                    f"the val split: a {d.val_fraction:g} slice of {d.root or d.source}")
        protocol["linear_probe"] = (f"n/a: {recon.pop('probe_na')}" if "probe_na" in recon else
                                    f"logistic regression on flattened final latents, class-stratified "
                                    f"{recon.pop('probe_train_images')} train images "
                                    f"({params.eval.probe_per_class} per class) -> {recon.pop('probe_val_images')} val")
        metrics = {k: float(v) for k, v in {**metrics, **recon}.items()}
        run.update({"ranks": dist.world_size, "device": dist.device.type, "wall_s": time.perf_counter() - t0})
        metrics.update(protocol=protocol, run=run)
        write_metrics("evaluate", metrics, tracker, path=Path(args.out) if args.out else None)
        scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
        tracker.log_dict(protocol, "protocol.json")
        log_final_metrics_to_parent(params, scalars)
        print("evaluate: " + ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
    return 0


def run(params: Params, args) -> int:
    """Bad input (NpzError, MetricError) propagates to the CLI, which prints it in one line with exit code 2."""
    dist = init_distributed(params.launcher.device, timeout_s=params.launcher.timeout_s)
    try:
        return evaluate(params, args, dist)
    finally:
        cleanup()
