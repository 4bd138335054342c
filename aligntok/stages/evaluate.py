"""`aligntok evaluate`: gFID, IS, precision/recall (with and without CFG) and the tokenizer's rFID/PSNR/SSIM/LPIPS.

Every number is written with its protocol (sample count, labels, sampler, steps, CFG, reference set, backbone)
so two numbers are compared only when their protocols match.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from aligntok.config import Params
from aligntok.io import write_bytes_atomic
from aligntok.stages.common import (DIT_DIR, OUTPUTS, REFERENCE_DIR, data_dir, feature_extractor, tokenizer_dir,
                                    write_metrics)
from aligntok.train.dist import cleanup, init_distributed
from aligntok.tracking import log_final_metrics_to_parent, stage_run

EVAL_DIR = OUTPUTS / "eval"
PR_FEATURES = 10_000  # ADM's reference batch keeps 10K images for precision/recall


def image_batches(dataset, n: int, batch_size: int):
    from aligntok.eval.recon import to_uint8
    for start in range(0, n, batch_size):
        x = torch.stack([dataset[i][0] for i in range(start, min(n, start + batch_size))])
        yield to_uint8(x)


def reference_stats(params: Params, extractor, reference_npz: str | None) -> dict:
    """Features/stats of the reference set: an ADM .npz if given, else the prepared train images (cached)."""
    from aligntok.data.dataset import ShardDataset
    from aligntok.data.shards import read_manifest
    from aligntok.eval.features import extract
    from aligntok.eval.metrics import feature_stats, load_stats, save_stats
    from aligntok.eval.npz import load_npz_samples

    if reference_npz:
        images, _ = load_npz_samples(reference_npz)
        feats, _ = extract(extractor, images, batch_size=params.eval.batch_size)
        mu, sigma = feature_stats(feats)
        return {"mu": mu, "sigma": sigma, "features": feats[:PR_FEATURES], "name": Path(reference_npz).name,
                "count": len(feats)}
    content = read_manifest(data_dir(params))["content_hash"]
    path = REFERENCE_DIR / f"{extractor.name}-{extractor.dim}-{content[:16]}.npz"
    feats_path = path.with_name(path.stem + "-features.npy")
    if path.exists() and feats_path.exists():
        mu, sigma, meta = load_stats(path)
        return {"mu": mu, "sigma": sigma, "features": np.load(feats_path), "name": meta["name"],
                "count": meta["count"]}
    train = ShardDataset(data_dir(params), "train")
    feats, _ = extract(extractor, image_batches(train, len(train), params.eval.batch_size))
    mu, sigma = feature_stats(feats)
    name = f"{params.data.name}-train"
    save_stats(path, mu, sigma, {"name": name, "count": len(feats), "backbone": extractor.name, "data_hash": content})
    buf = io.BytesIO()
    np.save(buf, feats[:PR_FEATURES])
    write_bytes_atomic(feats_path, buf.getvalue())  # a new inode: never writes through a DVC cache link
    return {"mu": mu, "sigma": sigma, "features": feats[:PR_FEATURES], "name": name, "count": len(feats)}


def generation_metrics(extractor, images: np.ndarray, ref: dict, batch_size: int) -> dict[str, float]:
    from aligntok.eval.features import extract
    from aligntok.eval.metrics import feature_stats, frechet_distance, inception_score, precision_recall

    feats, logits = extract(extractor, images, batch_size=batch_size)
    mu, sigma = feature_stats(feats)
    is_mean, _ = inception_score(logits, splits=min(10, max(1, len(feats) // 50)))
    precision, recall = precision_recall(ref["features"], feats[:PR_FEATURES])
    return {"gfid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]), "is": is_mean,
            "precision": precision, "recall": recall}


def run(params: Params, args) -> int:
    from aligntok.data.dataset import ShardDataset
    from aligntok.data.shards import read_manifest
    from aligntok.eval.npz import load_npz_samples
    from aligntok.eval.reconstruction import reconstruction_metrics
    from aligntok.generate import labelled_grid, load_generator
    from aligntok.losses import build_lpips
    from aligntok.models.tokenizer import AlignTokenizer
    from aligntok.stages.sample import generate_npz

    dist = init_distributed(params.launcher.device)
    e, s = params.eval, params.sample
    extractor = feature_extractor(params)
    ref = reference_stats(params, extractor, args.reference) if dist.is_main else None
    metrics: dict = {}
    protocol = {"fid_backbone": extractor.name, "feature_dim": extractor.dim, "reference": None,
                "num_samples": None, "labels": e.labels, "sampler": s.method, "steps": s.steps, "cfg_scale": e.cfg_scale, "cfg_channels": s.cfg_channels,
                "cfg_interval_start": s.cfg_interval_start, "timestep_shift": s.timestep_shift,
                "sample_seed": s.seed, "lpips_backbone": "pretrained" if params.lpips.pretrained_backbone else "random"}
    if ref is not None:
        protocol["reference"] = f"{ref['name']} ({ref['count']} images)"
    EVAL_DIR.mkdir(parents=True, exist_ok=True)
    with stage_run(params, "evaluate") as tracker:
        if args.samples:
            images, _ = load_npz_samples(args.samples)
            # how the external samples were made is not ours to report
            protocol.update({"samples": str(args.samples), "num_samples": len(images), "sampler": "external",
                             "labels": None, "steps": None, "cfg_scale": None, "cfg_channels": None,
                             "cfg_interval_start": None, "timestep_shift": None, "sample_seed": None})
            if dist.is_main:
                metrics.update(generation_metrics(extractor, images, ref, e.batch_size))
        else:
            gen = load_generator(DIT_DIR, tokenizer_dir(3), dist.device)
            protocol["num_samples"] = e.num_samples
            variants = [("", 1.0)] + ([("_cfg", e.cfg_scale)] if e.cfg_scale > 1 else [])
            for suffix, scale in variants:
                out = generate_npz(gen, params, e.num_samples, EVAL_DIR / f"samples{suffix}.npz", rank=dist.rank,
                                   world=dist.world_size, cfg_scale=scale, batch_size=e.batch_size)
                if out is not None:
                    images, labels = out
                    metrics.update({f"{k}{suffix}": v for k, v in
                                    generation_metrics(extractor, images, ref, e.batch_size).items()})
                    names = read_manifest(data_dir(params))["class_names"]
                    grid = labelled_grid(images[:40], labels[:40].tolist(), names, cols=10)
                    grid.save(EVAL_DIR / f"samples{suffix}.png")
                    tracker.log_artifact(EVAL_DIR / f"samples{suffix}.png", "samples")
        if dist.is_main:
            tokenizer = AlignTokenizer.from_pretrained(tokenizer_dir(3)).to(dist.device).eval()
            stage1 = AlignTokenizer.from_pretrained(tokenizer_dir(1)).to(dist.device).eval()
            recon = reconstruction_metrics(
                tokenizer, ShardDataset(data_dir(params), "val"), num_images=params.tokenizer.eval_images,
                device=dist.device, lpips_fn=build_lpips(params.lpips.net, params.lpips.pretrained_backbone).to(dist.device),
                extractor=extractor, reference=stage1)
            protocol["recon_images"] = recon.pop("num_images")
            metrics.update(recon)
            metrics = {k: float(v) for k, v in metrics.items()}
            metrics["protocol"] = protocol
            write_metrics("evaluate", metrics, tracker, path=Path(args.out) if args.out else None)
            scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
            tracker.log_dict(protocol, "protocol.json")
            log_final_metrics_to_parent(params, scalars)
            print("evaluate: " + ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
    cleanup()
    return 0
