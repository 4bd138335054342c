"""Atomic file writes: a reader never sees a half-written output, and a killed stage leaves the old file."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any


class WriteError(OSError):
    """A file could not be written (disk full, read-only, ...); the previous version of it is intact."""


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or type(e).__name__)
        raise WriteError(e.errno, f"{path}: could not be written ({reason}); its previous version is intact") from None


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


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found; run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno})") from None
