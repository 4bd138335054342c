"""tokenizer.kind 'external': a pretrained diffusers AutoencoderKL (the FLUX VAE, an SD VAE) as the tokenizer.

It never trains: tokenizer-stage1 resolves `tokenizer.external` (a Hugging Face id or a local folder, plus
`tokenizer.external_subfolder`), loads it frozen and writes the tokenizer folder; stages 2 and 3 pass that folder on.
The folder is a real artefact, so DVC and the latent cache's tokenizer hash see the weights themselves:

    config.json   {"kind": "external", "external": <id or folder>, "external_subfolder": ..., "external_digest":
                   sha256 of the source weights file, "image_size", "latent_channels", "latent_stride"}
    vae/          the AutoencoderKL, written by diffusers' save_pretrained (config.json +
                  diffusion_pytorch_model.safetensors), loadable with AutoencoderKL.from_pretrained(<folder>/vae)

The VAE's own scaling_factor/shift_factor are not used: cache-latents measures the latent statistics the DiT
normalises with, as it does for the trained tokenizers. diffusers is imported only when an external VAE is loaded.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from aligntok.models.tokenizer import CONFIG_FILE, TokenizerLoadError

VAE_DIR = "vae"
VAE_CONFIG, VAE_WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"
VAE_WEIGHTS_PATH = f"{VAE_DIR}/{VAE_WEIGHTS}"  # what fingerprint.tokenizer_hash hashes in an external folder
CONFIG_KEYS = ("kind", "external", "external_subfolder", "external_digest", "image_size", "latent_channels",
               "latent_stride")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # a Hugging Face id: name or owner/name


class ExternalLoadError(TokenizerLoadError, ValueError):
    """tokenizer.external cannot be resolved or loaded (one line naming the param or the file). A ValueError too, so
    preflight reports it as a failed check; a TokenizerLoadError, so a stage exits 2 with that line."""


def _is_path(source: str) -> bool:
    """A local folder, not a Hugging Face id: it exists, or it can only be a path (/x, ./x, ~/x, a/b/c)."""
    return Path(source).expanduser().exists() or not _REPO_ID.match(source) or ".." in source


def _check_folder(folder: Path, what: str) -> Path:
    """`folder` holds an AutoencoderKL saved by diffusers (safetensors weights: a pickle could run code)."""
    if not (folder / VAE_CONFIG).is_file():
        hint = (f" (it has {VAE_DIR}/{VAE_CONFIG}: set tokenizer.external_subfolder: {VAE_DIR})"
                if (folder / VAE_DIR / VAE_CONFIG).is_file() else "")
        raise ExternalLoadError(f"tokenizer.external: {what}: no {VAE_CONFIG} in {folder}; expected a diffusers "
                                f"AutoencoderKL folder{hint}")
    try:
        name = json.loads((folder / VAE_CONFIG).read_text()).get("_class_name", "AutoencoderKL")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ExternalLoadError(f"tokenizer.external: {folder / VAE_CONFIG} is not a JSON object ({e})") from None
    if name != "AutoencoderKL":
        raise ExternalLoadError(f"tokenizer.external: {what}: {folder / VAE_CONFIG} is a {name}; expected an "
                                "AutoencoderKL")
    if not (folder / VAE_WEIGHTS).is_file():
        raise ExternalLoadError(f"tokenizer.external: {what}: no {VAE_WEIGHTS} in {folder}; expected the VAE's "
                                "weights as one safetensors file")
    return folder


def resolve_external_vae(source: str, subfolder: str | None = None) -> Path:
    """The local folder holding the AutoencoderKL's config.json and diffusion_pytorch_model.safetensors: `source`
    (+ `subfolder`) when it is a folder, else the Hugging Face cache's snapshot of id `source`, downloaded first
    unless offline. ExternalLoadError, one line naming tokenizer.external, when there is none."""
    what = f"{source!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    if _is_path(source):
        root = Path(source).expanduser()
        if not root.is_dir():
            raise ExternalLoadError(f"tokenizer.external: {root} not found; expected a local diffusers AutoencoderKL "
                                    "folder or a Hugging Face id (owner/name)")
        return _check_folder(root / subfolder if subfolder else root, what)
    from aligntok.weights import HubUnavailable, hub_snapshot
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        root = hub_snapshot(source, [prefix + VAE_CONFIG, prefix + VAE_WEIGHTS])
    except HubUnavailable as e:
        raise ExternalLoadError(f"tokenizer.external: {what}: {e}; expected a local folder or a Hugging Face id "
                                f"with {prefix}{VAE_WEIGHTS} (download it once online, or log in for a gated "
                                "repository)") from None
    return _check_folder(root / subfolder if subfolder else root, what)


def vae_geometry(source: str, subfolder: str | None = None) -> tuple[int, int]:
    """(latent channels, latent stride) of tokenizer.external, from its config.json alone (no diffusers import)."""
    folder = resolve_external_vae(source, subfolder)
    config = json.loads((folder / VAE_CONFIG).read_text())
    try:
        return int(config["latent_channels"]), 2 ** (len(config["block_out_channels"]) - 1)
    except (KeyError, TypeError, ValueError) as e:
        raise ExternalLoadError(f"tokenizer.external: {folder / VAE_CONFIG}: no usable {e}; expected "
                                "latent_channels and block_out_channels") from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_vae(folder: Path, where: str):
    """The AutoencoderKL of local `folder`, float32 whatever the file's dtype (a bf16 FLUX VAE too); every weight
    must come from the file (diffusers would random-init a missing one with only a warning)."""
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as dlogging
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # its missing-key and accelerate notices: the checks below say it in one line
    try:
        vae, info = AutoencoderKL.from_pretrained(str(folder), use_safetensors=True, local_files_only=True,
                                                  torch_dtype=torch.float32, low_cpu_mem_usage=False,
                                                  output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - diffusers' errors for a bad config or mismatched weights vary
        first = " ".join(ln.strip() for ln in (str(e).strip().splitlines() or [type(e).__name__])[:2])
        raise ExternalLoadError(f"{where}: cannot load the AutoencoderKL: {first[:300]}") from None
    finally:
        dlogging.set_verbosity(level)
    bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        raise ExternalLoadError(f"{where}: {VAE_WEIGHTS} does not match its {VAE_CONFIG}: "
                                + ", ".join(f"{k.split('_')[0]} {v[:3]} ({len(v)})" for k, v in bad.items() if v))
    return vae


class ExternalTokenizer(nn.Module):
    """A frozen diffusers AutoencoderKL behind the AlignTokenizer interface: encode, decode, latent_channels,
    latent_stride, grid_size, config. Always in eval mode: `train()` leaves it there."""

    def __init__(self, vae: nn.Module, config: dict):
        super().__init__()
        if next(vae.parameters()).dtype != torch.float32:
            vae = vae.to(torch.float32)
        self.vae = vae.eval().requires_grad_(False)
        stride = 2 ** (len(vae.config.block_out_channels) - 1)
        self.config = {**{k: None for k in CONFIG_KEYS}, **config, "kind": "external",
                       "latent_channels": int(vae.config.latent_channels), "latent_stride": stride}

    @classmethod
    def from_source(cls, source: str, subfolder: str | None = None, image_size: int = 256) -> "ExternalTokenizer":
        """Load tokenizer.external (+ tokenizer.external_subfolder) through `resolve_external_vae`."""
        folder = resolve_external_vae(source, subfolder)
        vae = _load_vae(folder, f"tokenizer.external {source!r}")
        return cls(vae, {"external": source, "external_subfolder": subfolder, "image_size": int(image_size),
                         "external_digest": "sha256:" + file_sha256(folder / VAE_WEIGHTS)})

    def train(self, mode: bool = True) -> "ExternalTokenizer":
        return super().train(False)

    @property
    def latent_channels(self) -> int:
        return self.config["latent_channels"]

    @property
    def latent_stride(self) -> int:
        return self.config["latent_stride"]

    @property
    def grid_size(self) -> int:
        return self.config["image_size"] // self.latent_stride

    def encode_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(x).latent_dist
        return dist.mean, dist.logvar

    def encode(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """x in [-1, 1], Bx3xHxW -> the posterior's mean, B x latent_channels x H/stride x W/stride. The mean, not a
        sample: the latent cache, the reconstruction metrics and a resumed cache-latents must get the same latent for
        the same image on every run and rank (as AlignTokenizer.encode does); these VAEs' posterior std is small, so
        the DiT learns the same distribution up to that noise. `sample=True` draws from the posterior instead."""
        mean, logvar = self.encode_posterior(x)
        return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample

    def forward(self, x: torch.Tensor):
        mean, logvar = self.encode_posterior(x)
        return self.decode(mean), mean, logvar

    def save_pretrained(self, directory: Path | str) -> None:
        """config.json + vae/ (diffusers' save_pretrained, safetensors) into a temporary sibling, then swapped in."""
        from aligntok.io import write_dir_atomic

        def fill(tmp: Path) -> None:
            self.vae.save_pretrained(str(tmp / VAE_DIR), safe_serialization=True)
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        write_dir_atomic(directory, fill)

    @classmethod
    def from_pretrained(cls, directory: Path | str, map_location="cpu") -> "ExternalTokenizer":
        """A folder written by `save_pretrained` (AlignTokenizer.from_pretrained sends kind 'external' here)."""
        directory = Path(directory)
        try:
            config = json.loads((directory / CONFIG_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TokenizerLoadError(f"{directory / CONFIG_FILE}: cannot read ({e})") from None
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if config.get("kind") != "external" or unknown:
            raise TokenizerLoadError(f"{directory / CONFIG_FILE}: expected an external tokenizer's keys "
                                     f"{list(CONFIG_KEYS)}; got kind {config.get('kind')!r}, unknown {unknown}")
        for name in (VAE_CONFIG, VAE_WEIGHTS):
            if not (directory / VAE_DIR / name).is_file():
                raise TokenizerLoadError(f"{directory / VAE_DIR / name} not found: not a saved external tokenizer "
                                         f"(save_pretrained writes {CONFIG_FILE} and {VAE_DIR}/)")
        model = cls(_load_vae(directory / VAE_DIR, str(directory / VAE_DIR)), config)
        for key in ("latent_channels", "latent_stride"):
            if config.get(key) is not None and config[key] != model.config[key]:
                raise TokenizerLoadError(f"{directory / CONFIG_FILE}: {key} {config[key]} does not match the VAE in "
                                         f"{directory / VAE_DIR} ({model.config[key]})")
        return model.to(map_location)
