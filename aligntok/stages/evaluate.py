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
                   "train-split": "mu/sigma of every image of the prepared train split"}


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


def protocol_of(params: Params, extractor, ref: dict | None) -> dict:
    e, s = params.eval, params.sample
    protocol = {**provenance(params), "fid_backbone": extractor.name, "feature_dim": extractor.dim,
                "reference": None, "reference_choice": None, "reference_stats": None, "num_samples": e.num_samples,
                "labels": e.labels, "sampler": s.method, "steps": s.steps, "cfg_scale": e.cfg_scale,
                "cfg_channels": s.cfg_channels, "cfg_interval_start": s.cfg_interval_start,
                "timestep_shift": s.timestep_shift, "sample_seed": s.seed,
                "precision_recall": "all samples vs the reference batch, k=3",
                "lpips_backbone": "pretrained" if params.lpips.pretrained_backbone else "random",
                "judge_backbone": ("judge CNN, 128-d, trained on held-out synthetic images; FD and P/R vs its "
                                   f"{params.judge.test_images} held-out test images"
                                   if params.judge.source == "synthetic" else None)}
    if ref is not None:
        protocol["reference"] = f"{ref['name']} ({ref['count']} images)"
        # own statistics are a labelled choice: no published number is measured against them
        protocol["reference_choice"] = OWN_REFERENCE if ref["stats"] == "train-split" else "file"
        protocol["reference_stats"] = REFERENCE_STATS[ref["stats"]]
        protocol["pr_reference_images"] = len(ref["features"])
    return protocol


def sample_and_score(params: Params, dist, coord, extractor, ref: dict | None, judge: tuple | None,
                     tracker) -> tuple[dict, dict]:
    """Samples every variant's parts over all ranks, then (rank 0) scores them, with the judge too (`load_judge`'s
    result; None: off): (metrics, run bookkeeping)."""
    from aligntok.data.shards import read_manifest
    from aligntok.eval.parts import PartStore, Variant, run_parts, sample_key, split_parts
    from aligntok.eval.scores import score_parts
    from aligntok.generate import labelled_grid, load_generator

    e = params.eval
    gen = load_generator(DIT_DIR, tokenizer_dir(3), dist.device)
    store = PartStore(PARTS_DIR, sample_key(gen, params, dist.device), gen.config["num_classes"], e.labels,
                      params.sample.seed)
    variants = [Variant("", 1.0)] + ([Variant("_cfg", e.cfg_scale)] if e.cfg_scale > 1 else [])
    parts = {v: split_parts(v, e.num_samples, e.batch_size) for v in variants}
    generated = run_parts(store, [p for v in variants for p in parts[v]], coord, gen, params.sample, extractor, e.amp)
    if not coord.is_main:
        return {}, {}
    metrics: dict = {}
    names = read_manifest(data_dir(params))["class_names"]
    for v in variants:
        out = score_parts(store, parts[v], extractor.tag, ref, dist.device, EVAL_DIR / f"samples{v.suffix}.npz")
        metrics.update({f"{k}{v.suffix}": x for k, x in out["metrics"].items()})
        metrics[f"sample_s_per_image{v.suffix}"] = out["seconds"] / out["n"]
        metrics.update({f"{k}{v.suffix}": x for k, x in judged(judge, EVAL_DIR / f"samples{v.suffix}.npz").items()})
        grid = labelled_grid(out["grid"], out["grid_labels"].tolist(), names, cols=10)
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
        check_dit(DIT_DIR, tokenizer_dir(3))
        judge = None if params.judge.source == "none" else load_judge(JUDGE_DIR)
    extractor = feature_extractor(params).to(dist.device)
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
            metrics, run = sample_and_score(params, dist, coord, extractor, ref, judge, tracker)
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
