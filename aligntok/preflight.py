"""Checks before step 0: every stage's pretrained weights, and with `aligntok preflight` a whole profile.

A stage that fetches a weight file at first use fails after hours of training on an offline node (and its rerun
trains 0 steps and fails again). `require_stage` resolves every file the stage will load, through the functions
the stage's loaders call themselves (`resolve_encoder_weights`, `resolve_lpips_weights`, `resolve_feature_weights`,
`resolve_external_vae`), so a file that passes is the file the stage loads; the CLI calls it before dispatching any
stage.
Online, resolving downloads into the same caches the loaders read, so the stage itself never waits on the network.

`profile_checks` adds what a first run on a cluster needs: data folders, the reference batch, torch's CUDA build
against the driver, free disk for the stage outs, a writable project folder, and the multi-node plumbing of
`aligntok.multinode`.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aligntok.config import OWN_REFERENCE, ConfigError, Params
from aligntok.preflight_disk import disk_estimate

TOKENIZER_STAGES = ("tokenizer-stage1", "tokenizer-stage2", "tokenizer-stage3")


class PreflightError(RuntimeError):
    """Something a stage needs before step 0 is missing; the message says which param and what to do."""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str  # one line


def _run(name: str, fn: Callable[[], str]) -> Check:
    from aligntok.eval.features import FeatureWeightsError
    from aligntok.losses import LPIPSError
    from aligntok.models.encoder import EncoderLoadError
    try:
        return Check(name, True, fn())
    except (EncoderLoadError, LPIPSError, FeatureWeightsError, ConfigError, ValueError, OSError) as e:
        return Check(name, False, str(e).splitlines()[0] if str(e) else type(e).__name__)


def _encoder(p: Params) -> str:
    from aligntok.models.encoder import resolve_encoder_weights
    path = resolve_encoder_weights(p.encoder.arch, p.encoder.pretrained)
    return f"{p.encoder.arch} ({p.encoder.pretrained}): {path or 'random init'}"


def _external(p: Params) -> str:
    from aligntok.models.external import resolve_external_vae
    t = p.tokenizer
    sub = f" (subfolder {t.external_subfolder})" if t.external_subfolder else ""
    return f"{t.external}{sub}: {resolve_external_vae(t.external, t.external_subfolder)}"


def _text_encoder(p: Params) -> str:
    from aligntok.models.text_encoder import resolve_text_encoder
    return f"{p.text.encoder}: {resolve_text_encoder(p.text.encoder)}"


def _clip(p: Params) -> str:
    from aligntok.eval.clip_score import resolve_clip
    return f"{p.text.clip_model}: {resolve_clip(p.text.clip_model)}"


def _lpips(p: Params) -> str:
    from aligntok.losses import resolve_lpips_weights
    files = resolve_lpips_weights(p.lpips.net, p.lpips.pretrained_backbone)
    trunk = files[1] if len(files) > 1 else "random trunk (not a perceptual metric)"
    return f"{p.lpips.net}: heads {files[0].name}, trunk {trunk}"


def _features(p: Params) -> str:
    from aligntok.eval.features import resolve_feature_weights
    path = resolve_feature_weights(p.eval.fid_backbone, p.eval.inception_weights)
    return f"{p.eval.fid_backbone}: {path or 'seeded random init'}"


def weight_needs(stage: str, params: Params) -> dict[str, Callable[[], str]]:
    """The downloaded weights `stage` loads, by the param that chooses them -> a resolver returning one line.
    Stage outputs (saved tokenizers, the DiT, the judge) are not here: each stage reads them before step 0 itself
    (evaluate and train-dit load the judge before step 0), and DVC runs the stages that make them first."""
    needs: dict[str, Callable[[], str]] = {}
    if stage == "tokenizer-stage1" and params.tokenizer.kind == "aligntok":  # later stages load saved tokenizers
        needs["encoder.pretrained"] = lambda: _encoder(params)
    if stage == "tokenizer-stage1" and params.tokenizer.kind == "external":  # the pretrained VAE stage 1 saves
        needs["tokenizer.external"] = lambda: _external(params)
    if stage in TOKENIZER_STAGES or stage == "evaluate":  # training loss and/or reconstruction metrics, rFID
        needs["lpips.pretrained_backbone"] = lambda: _lpips(params)
        needs["eval.fid_backbone"] = lambda: _features(params)
    if params.task == "text" and stage in ("cache-text", "evaluate", "sample"):  # captions and prompts are encoded
        needs["text.encoder"] = lambda: _text_encoder(params)
    if params.task == "text" and stage == "evaluate" and params.text.clip_model:
        needs["text.clip_model"] = lambda: _clip(params)
    return needs


def require_stage(stage: str, params: Params) -> None:
    """Resolve every weight file of `stage` now; PreflightError with the first failure (and how many more)."""
    failed = [c for c in (_run(name, fn) for name, fn in weight_needs(stage, params).items()) if not c.ok]
    if failed:
        more = f" (and {len(failed) - 1} more: `aligntok preflight` lists them)" if len(failed) > 1 else ""
        raise PreflightError(f"{failed[0].detail}{more}")


def weight_checks(params: Params, stages: list[str]) -> list[Check]:
    """Each downloaded weight the profile's stages load, once, with the stages that need it."""
    users: dict[str, list[str]] = {}
    resolvers: dict[str, Callable[[], str]] = {}
    for stage in stages:
        for name, fn in weight_needs(stage, params).items():
            users.setdefault(name, []).append(stage)
            resolvers.setdefault(name, fn)
    checks = []
    for name, fn in resolvers.items():
        c = _run(f"weights {name}", fn)
        checks.append(Check(c.name, c.ok, f"{c.detail} [{', '.join(users[name])}]"))
    return checks


def _path_check(key: str, value: str | None, base: Path, kind: str) -> Check:
    path = (base / value).expanduser() if value else None
    if path is not None and path.exists():
        return Check(key, True, f"{path} ({kind})")
    return Check(key, False, f"{key}: {value!r} not found (expected {kind}); set {key} to an existing path")


def data_checks(params: Params, base: Path) -> list[Check]:
    d, ref = params.data, params.eval.reference
    checks = []
    if d.source in ("synthetic", "scenes"):
        checks.append(Check("data.root", True, f"{d.source} source: prepare draws the images"))
    else:
        checks.append(_path_check("data.root", d.root, base, f"{d.source} source"))
        if d.val_root is not None:
            checks.append(_path_check("data.val_root", d.val_root, base, f"{d.source} val images"))
    if params.task == "text":
        for key, value, kind in (("text.prompts", params.text.prompts, "a prompt file, one caption per line"),
                                 ("text.prompt_images", params.text.prompt_images, "the prompts' reference images")):
            checks.append(_path_check(key, value, base, kind) if value else
                          Check(key, True, "null: the val split's " + ("captions" if key == "text.prompts" else "images")))
    elif ref in (None, OWN_REFERENCE):
        checks.append(Check("eval.reference", True, "own: statistics of the prepared train split"))
    else:
        checks.append(_path_check("eval.reference", ref, base, "an ADM reference batch .npz"))
    return checks


def cuda_check(params: Params) -> Check:
    """torch's version and CUDA build, the driver; fails when nvidia-smi lists GPUs torch cannot use, or when
    launcher.device/nproc_per_node ask for more than torch sees (the checks every GPU entry point makes)."""
    import warnings

    import torch

    from aligntok.launch import GpuUnavailable, _check_device, check_cuda_visible, nvidia_driver
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    driver = nvidia_driver()
    detail = (f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, driver "
              f"{driver or 'none (no nvidia-smi)'}, {gpus} GPU(s) visible to torch")
    try:
        check_cuda_visible()
        _check_device(params.launcher)
    except (GpuUnavailable, ConfigError) as e:
        return Check("cuda", False, f"{e} ({detail})")
    return Check("cuda", True, detail)


def disk_check(params: Params, base: Path, project: Path) -> Check:
    try:
        need, how = disk_estimate(params, base, project)
    except (OSError, ValueError) as e:
        return Check("disk", False, f"cannot estimate the stage outs: {e}")
    free = shutil.disk_usage(project).free
    line = f"{free / 1e9:.1f} GB free in {project}, the stage outs need about {need / 1e9:.1f} GB: {how}"
    return Check("disk", free >= need, line if free >= need else f"too little disk: {line}")


def project_check(project: Path, mounts_text: str) -> Check:
    from aligntok.multinode import fs_type
    try:
        with tempfile.NamedTemporaryFile(dir=project, prefix=".preflight-"):
            pass
    except OSError as e:
        return Check("project folder", False, f"{project} is not writable ({e.strerror}); run from a writable "
                                              "checkout on the folder every node shares")
    return Check("project folder", True, f"{project} writable, on {fs_type(project, mounts_text)} (every node "
                                         "must see it at this path)")


def plumbing_checks(params: Params, project: Path, mounts_text: str, env: dict[str, str]) -> list[Check]:
    from aligntok import multinode
    from aligntok.tracking.uri import tracking_uri
    nnodes = max(params.launcher.nnodes, int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1))
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError as e:
        address = f"unresolved ({e.strerror})"
    found = [("mlflow store", multinode.mlflow_store(tracking_uri(params), mounts_text)),
             ("dvc lock", multinode.dvc_lock(multinode.dvc_repo(project), mounts_text)),
             ("rendezvous", multinode.rendezvous_address(address, nnodes, env))]
    return [Check(name, ok, detail) for name, (ok, detail) in found]


def profile_checks(params: Params, params_path: Path, stages: list[str], mounts_text: str | None = None,
                   env: dict[str, str] | None = None, project: Path | None = None) -> list[Check]:
    """Every check of `aligntok preflight`, in the order of the table."""
    from aligntok.multinode import read_mounts
    base = params_path.resolve().parent
    project = (project or Path.cwd()).resolve()
    mounts_text = read_mounts() if mounts_text is None else mounts_text
    env = dict(os.environ if env is None else env)
    return [*weight_checks(params, stages), *data_checks(params, base), cuda_check(params),
            disk_check(params, base, project), project_check(project, mounts_text),
            *plumbing_checks(params, project, mounts_text, env)]


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    rows = [f"{'check':<{width}}  result  detail"]
    rows += [f"{c.name:<{width}}  {'ok' if c.ok else 'FAIL':<6}  {c.detail}" for c in checks]
    return "\n".join(rows)
