"""The reference side of gFID and precision/recall: (mu, sigma) for FID, a feature batch for precision/recall.

`eval.reference: null` - our own reference, the prepared train split. Every rank extracts the features of its
share of the split on its own device; mu/sigma come from float64 sums of features and of their outer products,
added up on rank 0 (so 1 or N ranks give the same statistics up to float64 summation order). The
precision/recall batch is a fixed random 10K of the train images, like ADM's 10K reference batch. Both are
cached under outputs/reference, keyed by the extractor tag (backbone, dim, weights) and the data content hash.

`eval.reference: <ADM reference batch .npz>` (e.g. VIRTUAL_imagenet256_labeled.npz) - ADM's protocol: when the
file holds `mu` and `sigma` (Inception pool_3 statistics of the whole ImageNet train set) FID uses them AS
STORED, exactly as openai/guided-diffusion's evaluator does, and arr_0 (its 10K images) serves only
precision/recall. The stored statistics are Inception's, so with another backbone, or in a file without them,
mu/sigma are recomputed from arr_0's features; the protocol's `reference_stats` says which.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from aligntok.io import write_bytes_atomic

PR_REFERENCE = 10_000  # images in ADM's reference batch, the real side of precision/recall
PR_SEED = 0


def pr_subset(n: int) -> np.ndarray:
    """Sorted indices of the train images whose features form the precision/recall reference."""
    if n <= PR_REFERENCE:
        return np.arange(n)
    return np.sort(np.random.default_rng(PR_SEED).permutation(n)[:PR_REFERENCE])


def stats_from_sums(n: int, total: np.ndarray, outer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mu and the unbiased covariance (as np.cov) from sum(f) and sum(f f^T) over n features, float64."""
    from aligntok.eval.metrics import MetricError
    if n < 2:
        raise MetricError(f"reference: {n} images; expected at least 2 for a covariance")
    mu = total / n
    sigma = (outer - n * np.outer(mu, mu)) / (n - 1)
    return mu, (sigma + sigma.T) / 2


def _save_npy(path: Path, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())  # a new inode: never writes through a DVC cache link


def _load_pr(path: Path, dim: int) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            feats = f["features"]
    except Exception:  # noqa: BLE001 - a missing or torn cache is recomputed
        return None
    ok = feats.dtype == np.float64 and feats.ndim == 2 and feats.shape[1] == dim and np.isfinite(feats).all()
    return feats if ok else None


def _rank_sums(extractor, data_dir: Path, coord, batch_size: int, num_workers: int, split: str = "train") -> dict:
    """This rank's feature count, sum, outer-product sum and its images of the precision/recall subset."""
    import torch
    from aligntok.data.dataset import ShardIterable
    from aligntok.eval.reconstruction import to_uint8

    ds = ShardIterable(data_dir, split, coord.rank, coord.world_size)
    subset = pr_subset(len(ds.base))
    n, total, outer = 0, np.zeros(extractor.dim), np.zeros((extractor.dim, extractor.dim))
    pr_idx, pr_feats = [], []
    for idx, x, _ in torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers):
        f = extractor(to_uint8(x))[0].numpy()
        n, total, outer = n + len(f), total + f.sum(0), outer + f.T @ f
        keep = np.isin(idx.numpy(), subset)
        pr_idx.append(idx.numpy()[keep])
        pr_feats.append(f[keep])
    return {"n": n, "total": total, "outer": outer, "pr_idx": np.concatenate(pr_idx) if pr_idx else np.zeros(0, int),
            "pr_feats": np.concatenate(pr_feats) if pr_feats else np.zeros((0, extractor.dim))}


def train_reference(extractor, coord, data_dir: Path, cache_dir: Path, name: str, *, batch_size: int,
                    num_workers: int = 0, split: str = "train") -> dict | None:
    """Own reference over the train split (the text task's prompt set: the val split), computed by all ranks once
    and cached; the dict on rank 0 only."""
    from aligntok.data.shards import read_manifest
    from aligntok.eval.metrics import MetricError, load_stats, save_stats

    content = read_manifest(data_dir)["content_hash"]
    stats_path = cache_dir / f"{extractor.tag}-{content[:16]}{'' if split == 'train' else '-' + split}.npz"
    pr_path = stats_path.with_name(stats_path.stem + "-pr.npz")
    ref = None
    if coord.is_main and stats_path.exists():
        try:
            mu, sigma, meta = load_stats(stats_path)
            feats = _load_pr(pr_path, extractor.dim)
            if feats is not None and len(mu) == extractor.dim:
                ref = {"mu": mu, "sigma": sigma, "features": feats, "name": meta["name"], "count": meta["count"],
                       "stats": f"{split}-split"}
        except (MetricError, KeyError):
            ref = None
    if coord.broadcast(ref is not None):
        return ref
    parts = coord.gather(_rank_sums(extractor, data_dir, coord, batch_size, num_workers, split))
    if not coord.is_main:
        return None
    n = sum(p["n"] for p in parts)
    mu, sigma = stats_from_sums(n, sum(p["total"] for p in parts), sum(p["outer"] for p in parts))
    idx = np.concatenate([p["pr_idx"] for p in parts])
    feats = np.concatenate([p["pr_feats"] for p in parts])[np.argsort(idx, kind="stable")]
    save_stats(stats_path, mu, sigma, {"name": name, "count": n, "backbone": extractor.name,
                                       "extractor": extractor.tag, "data_hash": content})
    _save_npy(pr_path, {"features": feats})
    return {"mu": mu, "sigma": sigma, "features": feats, "name": name, "count": n, "stats": f"{split}-split"}


def uses_stored_stats(path, extractor) -> bool:
    """Checks the file's layout (one-line NpzError); True when its stored mu/sigma are to be used as stored."""
    from aligntok.eval.npz import check_reference_npz
    inception = extractor.name == "inception"
    return check_reference_npz(path, extractor.dim if inception else None) and inception


def file_reference(path, extractor, cache_dir: Path, batch_size: int) -> dict:
    """An ADM reference batch (rank 0): stored or recomputed mu/sigma, arr_0 features for precision/recall."""
    from aligntok.eval.features import extract
    from aligntok.eval.metrics import feature_stats
    from aligntok.eval.npz import load_npz_samples, load_reference_stats
    from aligntok.fingerprint import file_hash

    path = Path(path)
    stored = uses_stored_stats(path, extractor)
    cache = cache_dir / f"adm-{file_hash(path)}-{extractor.tag}.npz"
    feats = _load_pr(cache, extractor.dim)
    if feats is None:
        images, _ = load_npz_samples(path)
        feats, _ = extract(extractor, images, batch_size=batch_size)
        _save_npy(cache, {"features": feats})
    mu, sigma = load_reference_stats(path) if stored else feature_stats(feats)
    return {"mu": mu, "sigma": sigma, "features": feats, "name": path.name, "count": len(feats),
            "stats": "stored" if stored else "recomputed"}
