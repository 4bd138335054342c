"""Atomic file writes: a reader never sees a half-written output, and a killed stage leaves the old file."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any


class WriteError(OSError):
    """A file could not be written (disk full, read-only, ...); the previous version of it is intact."""


def write_error(path: str | Path, e: OSError) -> WriteError:
    """The one-line error for a failed write of `path` (its temp file already removed by the caller)."""
    if isinstance(e, WriteError):
        return e
    path = Path(path)
    reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or type(e).__name__)
    kept = "its previous version is intact" if path.exists() else "no partial file was left"
    return WriteError(e.errno, f"{path}: could not be written ({reason}); {kept}")


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from None


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with its I/O failures raised as OSError carrying their errno: safetensors reports
    a full disk as a SafetensorError whose only trace of the cause is "(os error 28)" in its text."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def write_safetensors_atomic(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written to a temp name, synced, then renamed into place: readers see the whole file or
    none; a failed write (disk full) raises WriteError and leaves no temp file."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        save_safetensors(tensors, tmp, metadata)
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from None


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode())


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Swap a fully written temp directory into place (old copy removed only after the new one exists)."""
    final_dir = Path(final_dir)
    old = final_dir.with_name(f".{final_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def write_dir_atomic(directory: str | Path, fill) -> None:
    """Let `fill(tmp)` write a folder's files into a temporary sibling, then swap it in whole (`replace_dir`): a
    kill midway leaves the previous folder, never a half-written one."""
    import tempfile
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        fill(tmp)
        replace_dir(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found; run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno})") from None
