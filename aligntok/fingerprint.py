"""Content fingerprints: the short sha256 prefixes that tie one artefact to another (a latent cache or a DiT to
the tokenizer it was made with, a cached reference to its .npz, a stage's resume guard to its input). A base
module, so that eval/, generate.py and stages/ all import it from below rather than from each other."""
from __future__ import annotations

import hashlib
from pathlib import Path


def file_hash(path: Path) -> str:
    """The first 16 hex digits of the file's sha256, read in 1 MiB chunks (no whole-file read)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def tokenizer_hash(model_dir: Path) -> str:
    """A tokenizer export's identity: the hash of its weights (model.safetensors)."""
    return file_hash(Path(model_dir) / "model.safetensors")
