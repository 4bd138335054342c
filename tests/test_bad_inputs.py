"""Bad inputs across the DAG end in one line naming the file or field, exit code 2, no traceback; untrusted files
never execute code; credentials in a tracking URI never reach logs, params or artifacts."""
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import ROOT
from tests.test_pipeline import ci_copy, sh


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A ci-profile repo with its data prepared and a random-init tokenizer exported as stage 3."""
    from aligntok.config import load_params
    from aligntok.models.tokenizer import AlignTokenizer
    from aligntok.stages.tokenizer import tokenizer_config

    base = tmp_path_factory.mktemp("bad")
    repo, env = ci_copy(base)  # the caller's shell minus PREFECT_*/MLFLOW_*/ALIGNTOK_*/DVC_*, a private mlflow.db
    sh([sys.executable, "-m", "aligntok.cli", "prepare"], repo, env)
    params = load_params(repo / "params.yaml", check_paths=False)
    torch.manual_seed(0)
    AlignTokenizer(tokenizer_config(params)).save_pretrained(repo / "outputs/tokenizer/stage3/model")
    return repo, env


def _fails_in_one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("aligntok:")]
    assert len(lines) == 1, err[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _cli(repo, env, *args):
    return sh([sys.executable, "-m", "aligntok.cli", *args], repo, env, check=False)


def test_profile_name_that_is_a_path(prepared):
    repo, env = prepared
    (repo.parent / "x.yaml").write_text((repo / "profiles/ci.yaml").read_text())  # exists outside profiles/
    _fails_in_one_line(_cli(repo, env, "profile", "../x"), "'../x'", "available")


def test_cuda_requested_on_a_machine_without_it_stops_before_torchrun(prepared):
    repo, env = prepared
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = _cli(repo, env, "tokenizer-stage1", "-S", "launcher.device=cuda", "-S", "launcher.nproc_per_node=8")
    _fails_in_one_line(proc, "launcher.device", "no CUDA")
    assert "torchrun" not in proc.stderr and "rank" not in proc.stderr


def test_foundation_encoder_from_the_hub_without_network(prepared):
    repo, env = prepared
    proc = _cli(repo, dict(env, HF_HUB_OFFLINE="1"), "tokenizer-stage1", "-S", "encoder.arch=vit_small_patch14_dinov2",
                "-S", "encoder.pretrained=hub")
    _fails_in_one_line(proc, "vit_small_patch14_dinov2")


def test_corrupt_parquet_shard(prepared, tmp_path):
    repo, env = prepared
    shard = sorted((repo / "data/synthetic").glob("train-*.parquet"))[0]
    good = shard.read_bytes()
    try:
        shard.chmod(0o644)
        shard.write_bytes(good[: len(good) // 2])
        _fails_in_one_line(_cli(repo, env, "tokenizer-stage1"), shard.name)
    finally:
        shard.write_bytes(good)


@pytest.mark.parametrize("damage", ["missing", "mismatched"])
def test_tokenizer_folder_missing_or_mismatched_weights(prepared, tmp_path, damage):
    from safetensors.torch import load_file, save_file
    repo, env = prepared
    model = repo / "outputs/tokenizer/stage3/model"
    weights = model / "model.safetensors"
    good = weights.read_bytes()
    try:
        if damage == "missing":
            weights.unlink()
        else:
            tensors = load_file(str(weights))
            save_file({k: v for i, (k, v) in enumerate(tensors.items()) if i % 2}, str(weights))
        _fails_in_one_line(_cli(repo, env, "cache-latents"), "model.safetensors")
    finally:
        weights.write_bytes(good)


@pytest.mark.parametrize("arr", ["float", "gray", "object"])
def test_adm_npz_with_wrong_shape_or_dtype(prepared, tmp_path, arr):
    repo, env = prepared
    path = tmp_path / f"{arr}.npz"
    if arr == "float":
        np.savez(path, arr_0=np.zeros((4, 32, 32, 3), np.float32))
    elif arr == "gray":
        np.savez(path, arr_0=np.zeros((4, 32, 32), np.uint8))
    else:  # an object array needs pickle to load: refused, never unpickled
        np.savez(path, arr_0=np.array([{"a": 1}, None], dtype=object))
    _fails_in_one_line(_cli(repo, env, "evaluate", "--samples", str(path), "--out", str(tmp_path / "m.json")),
                       path.name)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_bearing_checkpoint_is_refused(tmp_path):
    from aligntok.train import checkpoint as ck
    from tests.test_train_loop import ToyRecipe, run
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "b", stop_after=5)  # a real checkpoint at step 4
    path = tmp_path / "b" / "step-00000004"
    evil = _Exploit()
    evil.marker = tmp_path / "pwned"
    torch.save({"optimizers": evil}, path / "state.pt")
    recipe = ToyRecipe()
    found = ck.Checkpoint(path, 4, "h", None)
    with pytest.raises(pickle.UnpicklingError):
        ck.load_checkpoint(found, modules={"net": recipe.model}, ema={}, optimizers={"main": recipe.opt},
                           schedulers={})
    assert not evil.marker.exists()


def test_servers_the_readme_starts_bind_loopback():
    text = (ROOT / "README.md").read_text()
    starts = re.findall(r"^(?:.*?\s)?((?:prefect server start|mlflow (?:ui|server))[^\n#]*)", text, re.M)
    assert starts, "README starts no server?"
    for cmd in starts:
        assert "--host 127.0.0.1" in cmd, cmd


def test_credentials_in_the_tracking_uri_never_reach_mlflow_or_logs(prepared, tmp_path):
    import mlflow
    repo, env = prepared
    secret = "s3cr3t-Pa55"
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tracking"]["uri"] = f"https://alice:{secret}@mlflow.example.invalid/?token={secret}"
    work = tmp_path / "w"
    sh(["git", "worktree", "add", "--detach", str(work), "HEAD"], repo, env)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    db = f"sqlite:///{tmp_path / 'cred.db'}"
    proc = sh([sys.executable, "-m", "aligntok.cli", "prepare"], work, dict(env, MLFLOW_TRACKING_URI=db))
    assert secret not in proc.stdout + proc.stderr
    client = mlflow.MlflowClient(tracking_uri=db)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs
    for run in runs:
        assert secret not in repr(run.data.params) + repr(run.data.tags)
        assert "***@mlflow.example.invalid" in run.data.params["tracking.uri"]
        for art in client.list_artifacts(run.info.run_id, "config"):
            local = client.download_artifacts(run.info.run_id, art.path, str(tmp_path))
            assert secret not in Path(local).read_text()


def _dit_export(repo, channels: int, config_channels: int, tokenizer: Path | None = None) -> Path:
    """A DiT export in outputs/dit/model with `channels`-channel weights, as train-dit writes it, trained on the
    latents of a real `channels`-channel tokenizer (another one, or `tokenizer`); config.json claims
    `config_channels`."""
    from aligntok.config import load_params
    from aligntok.models.dit_export import save_dit
    from aligntok.models.dit import build_dit
    from aligntok.models.tokenizer import AlignTokenizer
    from aligntok.fingerprint import tokenizer_hash
    from aligntok.stages.tokenizer import tokenizer_config

    params = load_params(repo / "params.yaml", check_paths=False)
    other = repo.parent / f"tokenizer-{channels}ch"
    torch.manual_seed(1)
    AlignTokenizer({**tokenizer_config(params), "latent_channels": channels}).save_pretrained(other)
    size = params.data.resolution // 16
    dit = build_dit(params.dit.model, input_size=size, in_channels=channels, num_classes=params.data.num_classes)
    out = repo / "outputs/dit/model"
    save_dit(dit, out, {"model": params.dit.model, "input_size": size, "in_channels": config_channels,
                        "num_classes": params.data.num_classes, "qk_norm": False,
                        "latent_stats": {"mean": [0.0] * config_channels, "std": [1.0] * config_channels},
                        "tokenizer_hash": tokenizer_hash(tokenizer or other)})
    return out


def test_dit_trained_on_other_channels_than_the_latents(prepared, tmp_path):
    """A DiT trained on 16-channel latents, evaluated against the 32-channel tokenizer (ci profile)."""
    repo, env = prepared
    out = _dit_export(repo, channels=16, config_channels=16)
    try:
        _fails_in_one_line(_cli(repo, env, "evaluate", "--out", str(tmp_path / "m.json")),
                           "outputs/dit/model", "16-channel", "32-channel", "re-run")
    finally:
        shutil.rmtree(out.parent)


def test_dit_weights_that_do_not_match_their_config(prepared, tmp_path):
    """16-channel weights beside a config.json that says 32 (two runs' files mixed): named, not a shape traceback."""
    repo, env = prepared
    out = _dit_export(repo, channels=16, config_channels=32)
    try:
        _fails_in_one_line(_cli(repo, env, "evaluate", "--out", str(tmp_path / "m.json")),
                           "outputs/dit/model/model.safetensors", "in_channels 32", "different DiTs")
    finally:
        shutil.rmtree(out.parent)


def test_evaluate_without_the_judge_stage_output(prepared, tmp_path):
    """The judge's folder is missing (deleted, or evaluate run by hand before `aligntok judge`): one line naming the
    file and the two ways out, before any sample is drawn."""
    repo, env = prepared
    out = _dit_export(repo, 32, 32, tokenizer=repo / "outputs/tokenizer/stage3/model")  # fits: the judge is next
    try:
        assert not (repo / "outputs/judge").exists()
        _fails_in_one_line(_cli(repo, env, "evaluate", "--out", str(tmp_path / "m.json")),
                           "outputs/judge/config.json: missing", "aligntok judge", "judge.source=none")
        assert not (repo / "checkpoints/evaluate").exists()  # failed before sampling
    finally:
        shutil.rmtree(out.parent)


def test_train_dit_with_the_probe_on_and_no_judge(prepared, tmp_path):
    """The probe (ci profile: every 10 steps) needs the judge: train-dit stops before its first step, in one line."""
    repo = tmp_path / "repo"
    shutil.copytree(prepared[0], repo, symlinks=True)
    env = prepared[1]
    sh([sys.executable, "-m", "aligntok.cli", "cache-latents"], repo, env)
    _fails_in_one_line(_cli(repo, env, "train-dit"), "outputs/judge/config.json: missing", "aligntok judge")
    assert not (repo / "checkpoints/train-dit").exists() or not list((repo / "checkpoints/train-dit").rglob("step-*"))
