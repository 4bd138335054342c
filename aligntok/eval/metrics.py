"""FID, Inception Score and improved precision/recall on feature arrays (numpy, float64).

Formulas follow the standard implementations: Fréchet distance as in pytorch-fid / the ADM evaluator
(Heusel et al. 2017), IS as in Improved-GAN / ADM (Salimans et al. 2016), precision/recall as the k-NN
manifold estimate of Kynkäänniemi et al. 2019 (k=3, as in the ADM evaluator).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from aligntok.io import write_bytes_atomic


class MetricError(ValueError):
    pass


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise MetricError(f"features: expected an (N>=2, D) array, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2).

    Tr((S1 S2)^1/2) is computed as the sum of sqrt-eigenvalues of the symmetric PSD matrix S1^1/2 S2 S1^1/2
    (same eigenvalues as S1 S2) in float64: no scipy.linalg.sqrtm, whose complex/NaN results with some BLAS
    builds gave peers broken FIDs (hustvl/LightningDiT#97)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.all(np.isfinite(a)):
            raise MetricError(f"{name} contains NaN or Inf; refusing to report an FID")
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise MetricError(f"statistics shapes differ: {mu1.shape}/{s1.shape} vs {mu2.shape}/{s2.shape}")
    r1 = _sqrt_psd(s1)
    eig = np.linalg.eigvalsh(r1 @ s2 @ r1)
    if eig.min() < -1e-6 * max(1.0, abs(eig.max())):
        raise MetricError(f"covariance product has a negative eigenvalue {eig.min():.3g}; statistics are broken")
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    if not np.isfinite(fd):
        raise MetricError("Fréchet distance is not finite")
    return max(fd, 0.0)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split; mean and std over splits."""
    logits = np.asarray(logits, np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in np.array_split(p, max(1, splits)):
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(py + 1e-12))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _pairwise_sq(a: np.ndarray, b: np.ndarray, batch: int = 2048) -> np.ndarray:
    out = np.empty((len(a), len(b)), np.float64)
    bb = (b * b).sum(1)
    for i in range(0, len(a), batch):
        x = a[i:i + batch]
        out[i:i + batch] = np.clip((x * x).sum(1)[:, None] + bb[None, :] - 2 * x @ b.T, 0, None)
    return out


def _radii(f: np.ndarray, k: int) -> np.ndarray:
    d = _pairwise_sq(f, f)
    return np.sqrt(np.partition(d, k, axis=1)[:, k])  # k-th neighbour, index 0 is the point itself


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Precision: share of fakes inside the real manifold (union of k-NN balls); recall: the converse."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if len(real) <= k or len(fake) <= k:
        raise MetricError(f"precision/recall need more than k={k} real and fake features")
    r_real, r_fake = _radii(real, k), _radii(fake, k)
    d = np.sqrt(_pairwise_sq(fake, real))
    precision = float((d <= r_real[None, :]).any(1).mean())
    recall = float((d.T <= r_fake[None, :]).any(1).mean())
    return precision, recall


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, meta: dict) -> None:
    import io
    import json
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    write_bytes_atomic(path, buf.getvalue())


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    import json
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f or "sigma" not in f:
            raise MetricError(f"{path}: expected arrays 'mu' and 'sigma'")
        meta = json.loads(bytes(f["meta"]).decode()) if "meta" in f else {}
        return f["mu"], f["sigma"], meta
