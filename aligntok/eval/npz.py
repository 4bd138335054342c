"""Sample batches in ADM's .npz layout: arr_0 = N x H x W x 3 uint8 (arr_1 = labels, optional)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from aligntok.io import write_bytes_atomic


class NpzError(ValueError):
    pass


def save_npz_samples(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise NpzError(f"{path}: expected N x H x W x 3 uint8 images, got {images.dtype} {images.shape}")
    buf = io.BytesIO()
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": np.asarray(labels, np.int64)}
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())


def load_npz_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    path = Path(path)
    if not path.exists():
        raise NpzError(f"{path}: sample file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "arr_0" not in f:
                raise NpzError(f"{path}: expected ADM layout with 'arr_0' (N x H x W x 3 uint8); found {list(f)}")
            images = f["arr_0"]
            labels = f["arr_1"] if "arr_1" in f else None
    except (OSError, ValueError) as e:
        if isinstance(e, NpzError):
            raise
        raise NpzError(f"{path}: not a readable .npz file ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise NpzError(f"{path}: arr_0 must be N x H x W x 3 uint8, got {images.dtype} {images.shape}")
    return images, labels
