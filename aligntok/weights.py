"""Downloaded pretrained weights (FID Inception, LPIPS's torchvision trunk, an external VAE): offline mode and the
download caches.

Every loader resolves its file through one function (`aligntok.eval.features.resolve_feature_weights`,
`aligntok.losses.resolve_lpips_weights`, `aligntok.models.encoder.resolve_encoder_weights`,
`aligntok.models.external.resolve_external_vae`) that `aligntok preflight` and the per-stage check before step 0
call too, so a file that passes the check is the file the stage loads.
"""
from __future__ import annotations

import os
from pathlib import Path

_TRUE = {"1", "on", "yes", "true"}  # huggingface_hub's reading of HF_HUB_OFFLINE


def offline() -> bool:
    """HF_HUB_OFFLINE (the Makefile sets it) or ALIGNTOK_OFFLINE: no download is tried, weights must be cached."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "ALIGNTOK_OFFLINE"))


def cached_download(url: str, path: Path) -> bool:
    """True when `path` holds the file, downloading `url` there first unless offline; False when it cannot."""
    if path.is_file():
        return True
    if offline():
        return False
    import torch
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=False)  # a temp file, renamed when complete
    except Exception:  # noqa: BLE001 - any network or disk failure means the same thing to the user
        return False
    return path.is_file()


class HubUnavailable(OSError):
    """A Hugging Face repository's files are neither in the local cache nor downloadable now; one line says why."""


def hub_snapshot(repo_id: str, allow_patterns: list[str]) -> Path:
    """The local snapshot folder of Hugging Face repo `repo_id` with the files matching `allow_patterns`, downloaded
    into the hub cache first unless offline (then only the cache is read). The caller checks which files it holds:
    an offline lookup returns the cached snapshot without looking inside it."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=offline()))
    except Exception as e:  # noqa: BLE001 - not cached, gated, unknown id, no network: one line for each
        if offline():
            raise HubUnavailable("not in the local Hugging Face cache and offline (HF_HUB_OFFLINE or "
                                 "ALIGNTOK_OFFLINE is set)") from None
        first = (str(e).strip().splitlines() or [""])[0]
        raise HubUnavailable(f"download failed ({type(e).__name__}: {first[:200]})") from None
