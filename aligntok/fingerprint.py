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
    """A tokenizer export's identity: the hash of its weights (model.safetensors; for tokenizer.kind external the
    diffusers VAE's vae/diffusion_pytorch_model.safetensors, see aligntok.models.external)."""
    path = Path(model_dir) / "model.safetensors"
    external = Path(model_dir) / "vae" / "diffusion_pytorch_model.safetensors"
    return file_hash(external if not path.exists() and external.exists() else path)
