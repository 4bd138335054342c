"""Sample batches in ADM's .npz layout: arr_0 = N x H x W x 3 uint8, arr_1 = integer labels (optional).
ADM reference batches (arr_0 plus mu/sigma/mu_s/sigma_s) load too; the extra arrays are ignored here
(`metrics.load_stats` reads their mu/sigma)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from aligntok.io import write_bytes_atomic


class NpzError(ValueError):
    pass


def _check(path, images: np.ndarray, labels: np.ndarray | None) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise NpzError(f"{path}: arr_0 must be N x H x W x 3 uint8 with N > 0, got {images.dtype} {images.shape}")
    if labels is not None and (labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer)):
        raise NpzError(f"{path}: labels must be {len(images)} integers, got {labels.dtype} {labels.shape}")


def save_npz_samples(path, images_uint8_nhwc, labels=None) -> None:
    images = np.asarray(images_uint8_nhwc)
    labels = None if labels is None else np.asarray(labels)
    _check(path, images, labels)
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels.astype(np.int64)}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())


def load_npz_samples(path) -> tuple[np.ndarray, np.ndarray | None]:
    path = Path(path)
    if not path.is_file():
        raise NpzError(f"{path}: sample file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise NpzError(f"{path}: a .npy array, not an .npz archive with arr_0")
            if "arr_0" not in f.files:
                raise NpzError(f"{path}: no arr_0 (ADM layout, N x H x W x 3 uint8); found {sorted(f.files)}")
            images = f["arr_0"]
            labels = f["arr_1"] if "arr_1" in f.files else None
    except (OSError, ValueError, EOFError) as e:
        if isinstance(e, NpzError):
            raise
        raise NpzError(f"{path}: not a readable .npz file ({type(e).__name__})") from None
    _check(path, images, labels)
    return images, labels
