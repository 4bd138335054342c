"""Sample batches in ADM's .npz layout: arr_0 = N x H x W x 3 uint8, arr_1 = integer labels (optional).
ADM reference batches (arr_0 plus mu/sigma/mu_s/sigma_s) load too: `load_npz_samples` ignores the extra arrays,
`check_reference_npz`/`load_reference_npz` validate and read mu/sigma (Inception pool_3 statistics of the whole
ImageNet train set, which ADM's evaluator uses for FID as stored)."""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Iterable

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


def npz_headers(path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array of an .npz from the member headers alone: an ADM reference batch holds
    ~2 GB of images, and every rank checks the file before any work starts."""
    path = Path(path)
    if not path.is_file():
        raise NpzError(f"{path}: file not found")
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as f:
                    major, _ = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                out[name[:-4]] = (tuple(shape), np.dtype(dtype))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        raise NpzError(f"{path}: not a readable .npz archive") from None
    return out


def check_images_npz(path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """arr_0 (and arr_1, if any) checked from the headers, before hours of other work; returns the headers."""
    h = npz_headers(path)
    if "arr_0" not in h:
        raise NpzError(f"{path}: no arr_0 (ADM layout, N x H x W x 3 uint8); found {sorted(h)}")
    shape, dtype = h["arr_0"]
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] == 0:
        raise NpzError(f"{path}: arr_0 must be N x H x W x 3 uint8 with N > 0, got {dtype} {shape}")
    if "arr_1" in h and (h["arr_1"][0] != (shape[0],) or h["arr_1"][1].kind not in "iu"):
        raise NpzError(f"{path}: labels must be {shape[0]} integers, got {h['arr_1'][1]} {h['arr_1'][0]}")
    return h


def check_reference_npz(path, stats_dim: int | None) -> bool:
    """Checks an ADM reference batch (arr_0 images; optional mu/sigma) from its headers; True when it holds
    mu and sigma. `stats_dim`: the feature dimension the stored statistics must have when they are used."""
    h = check_images_npz(path)
    if ("mu" in h) != ("sigma" in h):
        raise NpzError(f"{path}: holds only one of mu/sigma; expected both (ADM reference statistics) or neither")
    if "mu" not in h:
        return False
    (mu_shape, mu_dtype), (s_shape, s_dtype) = h["mu"], h["sigma"]
    d = stats_dim if stats_dim is not None else (mu_shape[0] if len(mu_shape) == 1 else -1)
    if mu_dtype.kind != "f" or mu_shape != (d,):
        raise NpzError(f"{path}: mu must be a float vector of {d} features, got {mu_dtype} {mu_shape}")
    if s_dtype.kind != "f" or s_shape != (d, d):
        raise NpzError(f"{path}: sigma must be a {d} x {d} float matrix, got {s_dtype} {s_shape}")
    return True


def load_reference_stats(path) -> tuple[np.ndarray, np.ndarray]:
    """mu/sigma (float64) of a reference batch that `check_reference_npz` passed; reads no images."""
    with np.load(path, allow_pickle=False) as f:
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise NpzError(f"{path}: mu/sigma contain NaN or Inf")
    return mu, sigma


def save_npz_streaming(path, count: int, chunks: Iterable[np.ndarray], labels: np.ndarray) -> None:
    """The ADM layout written chunk by chunk (50K images at 256 px are ~10 GB: never held whole in memory),
    to a temporary file that replaces `path` only once complete."""
    path = Path(path)
    labels = np.asarray(labels, dtype=np.int64)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    written, shape = 0, None
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                for chunk in chunks:
                    if shape is None:
                        shape = chunk.shape[1:]
                        header = {"descr": "|u1", "fortran_order": False, "shape": (count, *shape)}
                        np.lib.format.write_array_header_2_0(f, header)
                    _check(path, chunk, None)
                    if chunk.shape[1:] != shape:
                        raise NpzError(f"{path}: image chunk {chunk.shape} does not match {shape}")
                    f.write(np.ascontiguousarray(chunk).tobytes())
                    written += len(chunk)
            if written != count or labels.shape != (count,):
                raise NpzError(f"{path}: expected {count} images and labels, got {written} and {labels.shape}")
            with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, labels)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
