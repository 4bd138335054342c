"""gFID, IS and precision/recall of a sample set against a reference (`aligntok.eval.reference`), as ADM's
evaluator computes them: FID of all N samples' statistics (np.cov) against the reference mu/sigma; IS over all
N samples' logits in min(10, N/50) splits (10 splits of 5K at N = 50K, as there); precision/recall of all N
samples against the reference batch's features (k = 3, blocked distances: memory does not grow with N^2)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from aligntok.eval.npz import NpzError

GRID = 40  # samples shown in the labelled PNG


class PartError(NpzError):
    """A sample part vanished or broke between generation and scoring (another process touched the folder)."""


def generation_metrics(feats: np.ndarray, logits: np.ndarray, ref: dict,
                       device: torch.device | str = "cpu") -> dict[str, float]:
    from aligntok.eval.metrics import feature_stats, frechet_distance, inception_score, precision_recall

    mu, sigma = feature_stats(feats)
    is_mean, _ = inception_score(logits, splits=min(10, max(1, len(feats) // 50)))
    precision, recall = precision_recall(ref["features"], feats, device=device)
    return {"gfid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]), "is": is_mean,
            "precision": precision, "recall": recall}


def score_parts(store, parts: list, tag: str, ref: dict, device, out_npz: Path) -> dict:
    """Reads the parts in index order once: their images stream into `out_npz` (ADM layout) while features,
    logits and timings are collected; then scores them. Returns metrics, grid images/labels and the seconds
    the samples took to generate (summed over parts, i.e. one rank's time for all of them)."""
    from aligntok.eval.npz import save_npz_streaming

    feats, logits, grid = [], [], []
    seconds = 0.0

    def images():
        nonlocal seconds
        for p in parts:
            rec = store.read(p)
            if rec is None or not store.has_features(rec, tag):
                raise PartError(f"{store.path(p)}: sample part missing or invalid after generation; run again")
            feats.append(rec["features"])
            logits.append(rec["logits"])
            seconds += float(rec["meta"].get("gen_seconds", 0.0))
            if sum(len(g) for g in grid) < GRID:
                grid.append(rec["arr_0"][:GRID])
            yield rec["arr_0"]

    labels = np.concatenate([store.labels(p) for p in parts])
    n = len(labels)
    save_npz_streaming(out_npz, n, images(), labels)
    metrics = generation_metrics(np.concatenate(feats), np.concatenate(logits), ref, device)
    return {"metrics": metrics, "grid": np.concatenate(grid)[:GRID], "grid_labels": labels[:GRID],
            "seconds": seconds, "n": n}
