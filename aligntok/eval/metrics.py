"""FID, Inception Score and improved precision/recall on feature arrays (numpy, float64).

Fréchet distance: Heusel et al. 2017, as in pytorch-fid / the ADM evaluator (but see `frechet_distance` for
the matrix square root). IS: Salimans et al. 2016 as in Improved-GAN / the ADM evaluator. Precision/recall:
the k-NN manifold estimate of Kynkäänniemi et al. 2019 (k=3), as in the ADM evaluator's ManifoldEstimator.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from aligntok.io import write_bytes_atomic

EIG_TOL = 1e-6  # negative eigenvalues beyond this fraction of the largest mean broken statistics
ROW_BATCH = 1024  # precision/recall distance blocks: ROW_BATCH x COL_BATCH float64 at a time
COL_BATCH = 8192


class MetricError(ValueError):
    pass


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise MetricError(f"features: expected an (N>=2, D) array, got shape {f.shape}")
    if not np.all(np.isfinite(f)):
        raise MetricError("features contain NaN or Inf")
    return f.mean(0), np.cov(f, rowvar=False)


def _check_stats(mu, sigma, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.atleast_1d(np.asarray(mu, np.float64)), np.atleast_2d(np.asarray(sigma, np.float64))
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise MetricError(f"{which}: expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise MetricError(f"{which}: statistics contain NaN or Inf; refusing to report a Fréchet distance")
    return mu, sigma


def _psd_eigh(m: np.ndarray, what: str, vectors: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Eigen-decomposition of a symmetric PSD matrix in float64, via torch's LAPACK on ONE thread: numpy's
    OpenBLAS eigh took ~20 s at D=2048 on our CPUs, and multi-threaded MKL eigh slowed from 0.4 s to 24 s
    (D=1280) whenever another process held a core; single-threaded it stays under a few seconds."""
    sym = torch.from_numpy((m + m.T) / 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if vectors:
            w, v = (t.numpy() for t in torch.linalg.eigh(sym))
        else:
            w, v = torch.linalg.eigvalsh(sym).numpy(), None
    finally:
        torch.set_num_threads(threads)
    if not np.all(np.isfinite(w)):
        raise MetricError(f"{what}: eigen-decomposition produced NaN or Inf")
    if w.min() < -EIG_TOL * max(1.0, abs(w.max())):
        raise MetricError(f"{what} is not positive semi-definite (eigenvalue {w.min():.3g})")
    return np.clip(w, 0, None), v


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2).

    Tr((S1 S2)^1/2) is the sum of square roots of the eigenvalues of the symmetric PSD matrix
    S1^1/2 S2 S1^1/2 (similar to S1 S2, so the same eigenvalues), all via float64 symmetric eigensolvers. This replaces
    pytorch-fid's scipy.linalg.sqrtm, which can return complex or NaN results (hustvl/LightningDiT#97)."""
    mu1, s1 = _check_stats(mu1, sigma1, "stats 1")
    mu2, s2 = _check_stats(mu2, sigma2, "stats 2")
    if mu1.shape != mu2.shape:
        raise MetricError(f"feature dimensions differ: {len(mu1)} vs {len(mu2)}")
    w1, v1 = _psd_eigh(s1, "sigma1", vectors=True)
    _psd_eigh(s2, "sigma2")
    r1 = (v1 * np.sqrt(w1)) @ v1.T
    eig, _ = _psd_eigh(r1 @ s2 @ r1, "sqrt(sigma1) sigma2 sqrt(sigma1)")
    tr_covmean = np.sqrt(eig).sum()
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    if not np.isfinite(fd):
        raise MetricError("Fréchet distance is not finite")
    if fd < -EIG_TOL * max(1.0, np.trace(s1) + np.trace(s2)):
        raise MetricError(f"Fréchet distance came out negative ({fd:.3g}); statistics are broken")
    return max(fd, 0.0)


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) on softmax(logits), p(y) taken per split; mean and std over splits
    (Improved-GAN / ADM evaluator formula)."""
    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or len(z) == 0 or not np.all(np.isfinite(z)):
        raise MetricError(f"logits: expected a finite (N, classes) array, got shape {z.shape}")
    if not 1 <= splits <= len(z):
        raise MetricError(f"inception_score: splits={splits} needs 1 <= splits <= N={len(z)}")
    z = z - z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for part, log_part in zip(np.array_split(p, splits), np.array_split(log_p, splits)):
        py = part.mean(0)
        log_py = np.log(np.where(py > 0, py, 1.0))  # classes with p(y)=0 have p(y|x)=0: term is 0
        kl = (part * (log_part - log_py)).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    return ((a * a).sum(1)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_min(0)


def _blocks(n: int, size: int):
    return ((i, min(n, i + size)) for i in range(0, n, size))


def _knn_radii(f: torch.Tensor, k: int) -> torch.Tensor:
    """Squared distance to the k-th nearest neighbour (excluding the point itself). Rows and columns go in
    blocks, carrying the k+1 smallest distances per row, so memory is ROW_BATCH x COL_BATCH whatever N is."""
    f_sq = (f * f).sum(1)
    radii = torch.empty(len(f), dtype=f.dtype, device=f.device)
    for r0, r1 in _blocks(len(f), ROW_BATCH):
        best = None
        for c0, c1 in _blocks(len(f), COL_BATCH):
            d = _sq_dists(f[r0:r1], f[c0:c1], f_sq[c0:c1])
            d = d if best is None else torch.cat([best, d], 1)
            best = torch.topk(d, min(k + 1, d.shape[1]), dim=1, largest=False, sorted=True).values
        radii[r0:r1] = best[:, k]  # column 0 is the point itself
    return radii


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor) -> float:
    """Share of queries inside at least one k-NN ball of the support set (blocked like `_knn_radii`)."""
    s_sq = (support * support).sum(1)
    inside = 0
    for r0, r1 in _blocks(len(queries), ROW_BATCH):
        hit = torch.zeros(r1 - r0, dtype=torch.bool, device=queries.device)
        for c0, c1 in _blocks(len(support), COL_BATCH):
            hit |= (_sq_dists(queries[r0:r1], support[c0:c1], s_sq[c0:c1]) <= radii[None, c0:c1]).any(1)
        inside += int(hit.sum())
    return inside / len(queries)


def precision_recall(real_features, fake_features, k: int = 3, device: torch.device | str = "cpu"
                     ) -> tuple[float, float]:
    """Precision: share of fakes inside the real manifold (union of real k-NN balls); recall: share of reals
    inside the fake manifold. Kynkäänniemi et al. 2019 / ADM evaluator (every sample against the reference
    batch), squared Euclidean distances in float64 on `device` (a GPU makes 50K x 50K distances cheap)."""
    real, fake = np.asarray(real_features, np.float64), np.asarray(fake_features, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise MetricError(f"precision/recall: expected (N, D) arrays of equal D, got {real.shape} and {fake.shape}")
    if len(real) <= k or len(fake) <= k:
        raise MetricError(f"precision/recall need more than k={k} real and fake features")
    if not (np.all(np.isfinite(real)) and np.all(np.isfinite(fake))):
        raise MetricError("precision/recall: features contain NaN or Inf")
    real_t, fake_t = (torch.from_numpy(a).to(device) for a in (real, fake))
    precision = _coverage(fake_t, real_t, _knn_radii(real_t, k))
    recall = _coverage(real_t, fake_t, _knn_radii(fake_t, k))
    return precision, recall


def save_stats(path, mu, sigma, meta: dict) -> None:
    """mu/sigma plus JSON meta (must name `backbone` and `data_hash`) as .npz, written atomically."""
    mu, sigma = _check_stats(mu, sigma, str(path))
    missing = {"backbone", "data_hash"} - set(meta)
    if missing:
        raise MetricError(f"{path}: stats meta must include {sorted(missing)}")
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8))
    write_bytes_atomic(path, buf.getvalue())


def load_stats(path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Stats written by `save_stats`, or an ADM reference batch (its `mu`/`sigma` are Inception pool_3)."""
    path = Path(path)
    if not path.is_file():
        raise MetricError(f"{path}: stats file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f or "sigma" not in f:
                raise MetricError(f"{path}: expected arrays 'mu' and 'sigma', found {sorted(f.files)}")
            mu, sigma = f["mu"], f["sigma"]
            meta = json.loads(f["meta"].tobytes().decode()) if "meta" in f else {
                "backbone": "inception", "source": "adm-reference-batch", "name": path.name}
    except (OSError, ValueError) as e:
        if isinstance(e, MetricError):
            raise
        raise MetricError(f"{path}: not a readable stats .npz ({type(e).__name__})") from None
    mu, sigma = _check_stats(mu, sigma, str(path))
    return mu, sigma, meta
