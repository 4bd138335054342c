"""End to end on the `ci` profile in a temporary copy of the repo: DVC, MLflow, Prefect, compare, notebook.

The DAG runs once per test session (module fixture) and the tests read what it left behind.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

STAGES = ["prepare", "tokenizer-stage1", "tokenizer-stage2", "tokenizer-stage3", "cache-latents", "train-dit",
          "evaluate"]
SKIP = {".venv", ".git", "data", "outputs", "checkpoints", "mlflow.db", "mlartifacts", "runs", ".pytest_cache",
        "__pycache__", "tmp", "cache"}


def copy_repo(dest: Path) -> Path:
    top = str(ROOT)
    shutil.copytree(ROOT, dest, ignore=lambda d, names: [n for n in names if (d == top and n in SKIP)
                                                         or n in ("__pycache__", ".pytest_cache")
                                                         or n.endswith(".egg-info")])
    git = lambda *a: subprocess.run(["git", *a], cwd=dest, check=True, capture_output=True)
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy")
    return dest


def sh(cmd, cwd, env=None, check=True):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    e = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{base / 'mlflow.db'}", PREFECT_HOME=str(base / "prefect"))
    for var in ("ALIGNTOK_PARENT_RUN_ID", "ALIGNTOK_PIPELINE_ID"):
        e.pop(var, None)
    return e


@pytest.fixture(scope="module")
def repo(tmp_path_factory, env):
    repo = copy_repo(tmp_path_factory.mktemp("repo") / "aligntok")
    sh([sys.executable, "-m", "aligntok.cli", "profile", "ci"], repo, env)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "ci profile"], repo)
    t0 = time.perf_counter()
    proc = sh([sys.executable, "-m", "aligntok.cli", "repro"], repo, env)
    repo_info = {"first_repro_s": time.perf_counter() - t0, "first_repro_out": proc.stdout + proc.stderr}
    (repo / ".e2e.json").write_text(json.dumps(repo_info))
    return repo


def runs(env, experiment="aligntok"):
    import mlflow
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


@pytest.mark.slow
def test_repro_produces_every_out_and_metric(repo):
    for path in ["data/synthetic/manifest.json", "outputs/tokenizer/stage3/model/model.safetensors",
                 "outputs/latents/manifest.json", "outputs/dit/model/config.json", "outputs/eval/samples.png"]:
        assert (repo / path).exists(), path
    for stage in STAGES:
        assert (repo / "outputs" / "metrics" / f"{stage}.json").exists(), stage
    ev = json.loads((repo / "outputs/metrics/evaluate.json").read_text())
    for key in ["gfid", "is", "precision", "recall", "gfid_cfg", "rfid", "psnr", "ssim", "lpips", "semantic_cosine"]:
        assert isinstance(ev[key], float), key
    assert ev["protocol"]["fid_backbone"] == "efficientnet-lite0"
    assert ev["protocol"]["lpips_backbone"] == "random"


@pytest.mark.slow
def test_mlflow_has_one_parent_with_seven_children(repo, env):
    all_runs = runs(env)
    parents = [r for r in all_runs if r.data.tags.get("role") == "pipeline"]
    assert len(parents) == 1
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["stage"] for r in children) == sorted(STAGES)
    assert "gfid" in parents[0].data.metrics and "rfid" in parents[0].data.metrics


@pytest.mark.slow
def test_second_repro_is_a_noop(repo, env):
    t0 = time.perf_counter()
    out = sh(["dvc", "repro"], repo, env).stdout
    assert "Data and pipelines are up to date." in out
    assert "Running stage" not in out
    assert time.perf_counter() - t0 < 30


@pytest.mark.slow
def test_stage3_param_change_reruns_only_stage3_and_after(repo, env):
    out = sh(["dvc", "exp", "run", "-n", "lr3", "-S", "tokenizer.stage3.lr=5e-5"], repo, env).stdout
    ran = [s for s in STAGES if f"Running stage '{s}'" in out]
    assert ran == ["tokenizer-stage3", "cache-latents", "train-dit", "evaluate"], out[-2000:]
    show = sh(["dvc", "exp", "show", "--no-pager", "--json"], repo, env).stdout
    assert "lr3" in show
    sh(["dvc", "plots", "show", "-o", str(repo / "plots_html")], repo, env)
    assert (repo / "plots_html" / "index.html").exists()
    table = sh([sys.executable, "-m", "aligntok.cli", "compare", "--format", "csv"], repo, env).stdout
    header = table.splitlines()[0].split(",")
    assert "tokenizer.stage3.lr" in header and "gfid" in header
    assert len(table.strip().splitlines()) == 3  # header + two pipeline runs


@pytest.mark.slow
def test_prefect_flow_runs_every_stage_completed(repo, env):
    script = """
import asyncio, json
from pipelines.flow import aligntok_pipeline, PipelineParams, dag_stages
from prefect.client.orchestration import get_client
state = aligntok_pipeline(PipelineParams(profile="ci"), return_state=True)
result = state.result()
async def task_states():
    async with get_client() as c:
        trs = await c.read_task_runs()
        return [(t.name, t.state.type.value) for t in trs]
print("RESULT", json.dumps({"flow": state.type.value, "tasks": asyncio.run(task_states()), "dag": dag_stages(),
                              "stages": result["stages"]}))
"""
    out = sh([sys.executable, "-c", script], repo, env).stdout
    res = json.loads(out.split("RESULT", 1)[1])
    assert res["flow"] == "COMPLETED"
    assert res["stages"] == STAGES == res["dag"]
    # Prefect names task runs "<task name>-<short id>"
    by_length = sorted(STAGES, key=len, reverse=True)
    states = {next(st for st in by_length if name.startswith(st + "-")): s for name, s in res["tasks"]}
    assert set(states) == set(STAGES) and set(states.values()) == {"COMPLETED"}
    # the workspace's own results were not touched by the Prefect run
    assert not (repo / "runs").exists() or any((repo / "runs").iterdir())
    assert json.loads((repo / "outputs/metrics/evaluate.json").read_text())["protocol"]


@pytest.mark.slow
def test_notebook_executes(repo, env):
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(ROOT / "notebooks" / "compare_ablations.ipynb", as_version=4)
    old = dict(os.environ)
    os.environ.update({"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"]})
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(repo)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "loss curves over" in text and (repo / "outputs" / "compare_ablations.png").exists()


def test_dvc_stages_match_cli_stage_order():
    import yaml
    from aligntok.cli import STAGES as CLI_STAGES
    from pipelines.flow import dag_stages
    assert dag_stages() == list(CLI_STAGES) == STAGES
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert all(stages[s]["cmd"] == f"aligntok {s}" for s in STAGES)


def test_prepare_repro_then_noop(tmp_path, env):
    repo = copy_repo(tmp_path / "aligntok")
    sh([sys.executable, "-m", "aligntok.cli", "profile", "ci"], repo, env)
    first = sh(["dvc", "repro", "prepare"], repo, env).stdout
    assert "Running stage 'prepare'" in first
    manifest = json.loads((repo / "data/synthetic/manifest.json").read_text())
    assert sum(manifest["counts"]["train"].values()) + sum(manifest["counts"]["val"].values()) == 160
    second = sh(["dvc", "repro", "prepare"], repo, env).stdout
    assert "Running stage" not in second


@pytest.mark.slow
def test_dit_on_real_latents_learns_class_dependent_samples(repo, tmp_path):
    """On the pipeline's own latent cache: the DiT loss falls and samples sit nearer their own class mean."""
    import torch
    from aligntok.config import load_params
    from aligntok.data.latents import LatentDataset, normalize
    from aligntok.diffusion.sampler import sample
    from aligntok.models.dit import build_dit
    from aligntok.stages.dit import DitRecipe
    from aligntok.train.dist import DistInfo
    from aligntok.train.loop import train

    data = LatentDataset(repo / "outputs" / "latents")
    c, h, _ = data.manifest["latent_shape"]
    cfg = load_params(repo / "params.yaml").dit.model_copy(update={"steps": 400, "batch_size": 32, "lr": 1e-3,
                                                                    "ema_decay": None, "log_every": 50})
    torch.manual_seed(0)
    model = build_dit("tiny", input_size=h, in_channels=c, num_classes=data.num_classes, class_dropout_prob=0.1)
    out = train(DitRecipe(model, cfg, data.stats), data, cfg, dist=DistInfo(0, 1, 0, torch.device("cpu")),
                ckpt_dir=tmp_path / "ckpt", config_hash="x", seed=0)
    assert out["history"][-1]["loss"] < 0.8 * out["history"][0]["loss"]
    z = normalize(data.latents, data.stats).flatten(1)
    labels = data.labels
    means = torch.stack([z[labels == k].mean(0) for k in range(data.num_classes)])
    model.eval()
    y = torch.arange(data.num_classes).repeat_interleave(10)
    gen = sample(model, torch.randn(len(y), c, h, h, generator=torch.Generator().manual_seed(1)), y, steps=20,
                 method="heun", cfg_scale=2.0, null_class=data.num_classes).flatten(1)
    accuracy = (torch.cdist(gen, means).argmin(1) == y).float().mean().item()
    assert accuracy > 3 / data.num_classes, accuracy  # chance is 1/num_classes


@pytest.mark.slow
def test_evaluate_external_samples_and_reference(repo, env, tmp_path):
    """`evaluate --samples/--reference` on ADM npz files, on smoke-profile data (1024 synthetic 64 px images):
    FD of real val vs real train is far below FD of pure noise vs train (measured: 78 vs 891)."""
    import numpy as np
    import torch
    from aligntok.data.dataset import ShardDataset
    from aligntok.data.sources import prepare_dataset
    from aligntok.eval.npz import save_npz_samples
    from aligntok.eval.recon import to_uint8

    prepare_dataset("synthetic", tmp_path / "smoke", root=None, resolution=64, num_images=1024, num_classes=10,
                    val_fraction=0.1, shard_rows=256, seed=0)

    def npz(split, path):
        ds = ShardDataset(tmp_path / "smoke", split)
        x = to_uint8(torch.stack([ds[i][0] for i in range(len(ds))])).permute(0, 2, 3, 1).numpy()
        save_npz_samples(path, x)
        return x

    train = npz("train", tmp_path / "ref.npz")
    val = npz("val", tmp_path / "val.npz")
    save_npz_samples(tmp_path / "noise.npz", np.random.default_rng(0).integers(0, 256, val.shape, dtype=np.uint8))
    scores = {}
    for name in ("val", "noise"):
        out = tmp_path / f"{name}.json"
        sh([sys.executable, "-m", "aligntok.cli", "evaluate", "--samples", str(tmp_path / f"{name}.npz"),
            "--reference", str(tmp_path / "ref.npz"), "--out", str(out)], repo, env)
        scores[name] = json.loads(out.read_text())
    assert scores["val"]["protocol"]["samples"].endswith("val.npz")
    assert scores["val"]["protocol"]["reference"] == f"ref.npz ({len(train)} images)"
    assert scores["val"]["protocol"]["fid_backbone"] == "efficientnet-lite0"
    assert scores["noise"]["gfid"] > 5 * scores["val"]["gfid"], scores
