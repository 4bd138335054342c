"""What the first multi-GPU run needs that one CPU process never shows: per-stage Prefect timeouts from the profile,
finished stages kept when the GPU count changes, one checkpoint choice for every rank, a collective timeout taken from
the params, the allocation's CPUs under Slurm, and a loud stop when the torch build cannot use the node's GPUs."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from aligntok.config import LauncherConfig, load_params
from aligntok.launch import launch_command
from tests.conftest import ROOT
from tests.make_run import make
from tests.test_dvc_native import dvc_stages, recorded_repo  # noqa: F401 - recorded_repo is a fixture
from tests.test_pipeline import sh
from tests.test_user_paths import aligntok, clean_env


# ------------------------------------------------------------------------------------------------- 5: timeouts
def test_every_stage_has_a_timeout_and_the_paper_profile_is_generous():
    for profile in ("smoke", "ci", "imagenet256"):
        timeouts = load_params(ROOT / f"profiles/{profile}.yaml", check_paths=False).launcher.stage_timeout_h
        assert all(timeouts.seconds(stage) > 0 for stage in dvc_stages())  # no dvc.yaml stage without a field
    paper = load_params(ROOT / "profiles/imagenet256.yaml", check_paths=False).launcher
    assert paper.stage_timeout_h.seconds("train-dit") >= 40 * 3600  # about 10 h on one 8-H100 node
    assert paper.timeout_s >= 1800  # rank 0 alone writes and hashes an ~11 GB checkpoint


def test_the_prefect_flow_takes_each_stages_timeout_from_the_profile():
    from pipelines.flow import PipelineParams, stage_timeouts
    resolved = load_params(ROOT / "profiles/imagenet256.yaml", check_paths=False)
    stages = list(dvc_stages())
    got = stage_timeouts(PipelineParams(profile="imagenet256"), resolved, stages)
    assert got == {s: resolved.launcher.stage_timeout_h.seconds(s) for s in stages}
    assert got["train-dit"] == 48 * 3600 and got["judge"] == 6 * 3600
    assert set(stage_timeouts(PipelineParams(stage_timeout_s=600), resolved, stages).values()) == {600}


# ---------------------------------------------------------------------------------------- 6: the GPU count
def test_changing_the_gpu_count_keeps_every_finished_stage(recorded_repo):  # noqa: F811
    params = recorded_repo / "params.yaml"
    original = params.read_text()
    tree = yaml.safe_load(original)
    tree["launcher"].update(nproc_per_node=8, nnodes=2, rdzv_endpoint="node0:29500", rdzv_id="job-7",
                            timeout_s=7200, stage_timeout_h={**tree["launcher"]["stage_timeout_h"], "train_dit": 48})
    try:
        params.write_text(yaml.safe_dump(tree, sort_keys=False))
        assert "up to date" in sh(["dvc", "status"], recorded_repo).stdout
        tree["launcher"]["device"] = "cuda"  # bf16 autocast: other numbers
        params.write_text(yaml.safe_dump(tree, sort_keys=False))
        changed = set(json.loads(sh(["dvc", "status", "--json"], recorded_repo).stdout))
    finally:
        params.write_text(original)
    # cache-text too: the text encoder runs on the device (CUDA matmuls give other last bits)
    assert changed == {"tokenizer-stage1", "tokenizer-stage2", "tokenizer-stage3", "cache-latents", "cache-text",
                       "train-dit", "evaluate"}, changed


TINY_TOKENIZER = {"kind": "aligntok", "encoder_arch": "tf_efficientnet_lite0", "encoder_pretrained": "none",
                  "image_size": 32, "latent_channels": 4, "size": "tiny", "kl": False, "adapter_hidden": 8}


def _cache_latents(cwd: Path, nproc: int) -> subprocess.CompletedProcess:
    return aligntok(cwd, "cache-latents", "--params", str(ROOT / "profiles/ci.yaml"), "-S", "launcher.device=cpu",
                    "-S", f"launcher.nproc_per_node={nproc}", "-S", "latents.shard_rows=8", "-S", "latents.batch_size=4")


@pytest.mark.slow
def test_cache_latents_writes_the_same_files_on_one_and_two_ranks(tmp_path):
    """`aligntok cache-latents` as one process and as two gloo ranks under torchrun: the same shard names and bytes."""
    from aligntok.data.sources import prepare_dataset
    from aligntok.models.tokenizer import AlignTokenizer
    name = load_params(ROOT / "profiles/ci.yaml", check_paths=False).data.name
    torch.manual_seed(0)
    tokenizer = AlignTokenizer(TINY_TOKENIZER).eval()
    trees = {}
    for nproc in (1, 2):
        cwd = tmp_path / f"ranks{nproc}"
        prepare_dataset("synthetic", cwd / "data" / name, root=None, resolution=32, num_images=36, num_classes=4,
                        val_fraction=0.0, shard_rows=16, seed=0)
        tokenizer.save_pretrained(cwd / "outputs/tokenizer/stage3/model")
        proc = _cache_latents(cwd, nproc)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        trees[nproc] = {p.name: p.read_bytes() for p in (cwd / "outputs/latents").iterdir()}
    assert sorted(trees[1]) == sorted(trees[2]) == ["latents-00000.safetensors", "latents-00001.safetensors",
                                                    "latents-00002.safetensors", "latents-00003.safetensors",
                                                    "latents-00004.safetensors", "manifest.json"]
    assert trees[1] == trees[2]


# ------------------------------------------------------------------ 7 and 8: two gloo ranks, real processes
DRIVER = """
import json, sys, time
from pathlib import Path
from aligntok.train.checkpoint import find_checkpoint
from aligntok.train.dist import barrier, cleanup, init_distributed

mode, out, timeout_s = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
dist = init_distributed("cpu", shared_dir=out / "shared", timeout_s=timeout_s)
if mode == "resume":  # each rank is shown its own folder, as ranks whose NFS listings disagree would be
    found = find_checkpoint(out / f"ckpt-r{dist.rank}", "h")
    (out / f"choice-r{dist.rank}.json").write_text(json.dumps([str(found.path), found.step]))
else:  # rank 0 alone works past the collective timeout while rank 1 waits
    if dist.rank == 0:
        time.sleep(4 * timeout_s)
    barrier()
cleanup()
"""


def _two_ranks(tmp_path: Path, mode: str, timeout_s: float) -> subprocess.CompletedProcess:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), mode, str(tmp_path), str(timeout_s)], env=clean_env(), capture_output=True,
                          text=True, timeout=240)


def test_every_rank_resumes_the_checkpoint_rank_0_picked(tmp_path):
    from aligntok.train.checkpoint import save_checkpoint
    model = torch.nn.Linear(2, 2)
    for rank, step in ((0, 4), (1, 8)):  # rank 1 alone sees a newer checkpoint
        save_checkpoint(tmp_path / f"ckpt-r{rank}", step, modules={"m": model}, ema={}, optimizers={},
                        schedulers={}, state_hash="h", run_id=None, history=[])
    proc = _two_ranks(tmp_path, "resume", 600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chosen = [json.loads((tmp_path / f"choice-r{r}.json").read_text()) for r in (0, 1)]
    assert chosen == [[str(tmp_path / "ckpt-r0/step-00000004"), 4]] * 2


def test_the_collective_timeout_is_the_launcher_param(tmp_path):
    t0 = time.monotonic()
    proc = _two_ranks(tmp_path, "slow", 3)
    assert proc.returncode != 0
    assert "timed out" in proc.stderr.lower() or "timeout" in proc.stderr.lower(), proc.stderr[-3000:]
    assert time.monotonic() - t0 < 120  # gloo's own default would wait 30 minutes


# ------------------------------------------------------------------------------------------------ 9: Slurm
SLURM = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu01,gpu02"}


@pytest.mark.parametrize("cpus, expected", [({"SLURM_CPUS_PER_TASK": "64", "SLURM_CPUS_ON_NODE": "128"}, "64"),
                                            ({"SLURM_CPUS_ON_NODE": "96"}, "96"), ({}, None)])
def test_srun_passes_the_allocations_cpus(cpus, expected):
    cmd = launch_command(LauncherConfig(nproc_per_node=8, device="cpu"), ["train-dit"], {**SLURM, **cpus})
    assert cmd[:3] == ["srun", "--nodes=2", "--ntasks-per-node=1"]
    given = [a.split("=", 1)[1] for a in cmd if a.startswith("--cpus-per-task=")]
    assert given == ([expected] if expected else [])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2, reason="needs 2+ CPUs")
def test_worker_counts_follow_the_cpu_affinity_not_the_node():
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from aligntok.data.dataset import loader_workers; from aligntok.data.sources import resolve_workers; "
            "print(loader_workers(None, 1), resolve_workers(None), os.cpu_count())")
    out = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[:2] == ["1", "1"] and int(out[2]) >= 2


# ------------------------------------------------------------------------------------------- 3: CUDA builds
FAKE_SMI = """#!/bin/sh
case "$1" in
  -L) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"; echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)";;
  *) echo "535.183.01"; echo "535.183.01";;
esac
"""


@pytest.fixture
def gpus_torch_cannot_use(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here")
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(FAKE_SMI)
    (fake / "nvidia-smi").chmod(0o755)
    env = clean_env(ALIGNTOK_TRACKING="0")
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    return env


@pytest.mark.parametrize("entry", [["train-dit"], ["cache-latents", "-S", "launcher.nproc_per_node=2"], ["gpu-check"],
                                   ["bench", "ddp"]])
def test_gpus_that_torch_cannot_use_stop_every_gpu_entry_point(tmp_path, gpus_torch_cannot_use, entry):
    if entry == ["gpu-check"]:
        cmd = [sys.executable, "-m", "aligntok.bench.gpu_check", "--out", str(tmp_path / "g.json")]
    elif entry[0] == "bench":
        cmd = [sys.executable, "-m", "aligntok.cli", *entry]
    else:
        cmd = [sys.executable, "-m", "aligntok.cli", *entry[:1], "--params", str(ROOT / "profiles/ci.yaml"), *entry[1:]]
    proc = subprocess.run(cmd, cwd=tmp_path, env=gpus_torch_cannot_use, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(said) == 1 and "nvidia-smi lists 2 GPU(s) (driver 535.183.01)" in said[0], said
    assert "make install CUDA=cu126" in said[0]


def test_launcher_device_cpu_does_not_ask_for_the_gpus(tmp_path, gpus_torch_cannot_use):
    proc = aligntok(tmp_path, "cache-latents", "--params", str(ROOT / "profiles/ci.yaml"), "-S", "launcher.device=cpu",
                    env=gpus_torch_cannot_use)
    assert "nvidia-smi" not in proc.stderr and proc.returncode == 2, proc.stderr[-3000:]  # no tokenizer here


def test_make_install_with_a_cuda_build(tmp_path):
    pins = [d for d in __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
            if d.startswith(("torch==", "torchvision=="))]
    venv = f"VENV={tmp_path / 'venv'}"
    plan = make("-n", "install", "CUDA=cu126", venv, check=True).stdout
    assert (f"--index-url https://download.pytorch.org/whl/cu126 {pins[0]}+cu126 {pins[1]}+cu126" in plan), plan
    assert plan.index("whl/cu126") < plan.index("-e '.[dev]'")  # the CUDA build first: the pins then hold
    assert "download.pytorch.org" not in make("-n", "install", venv, check=True).stdout
    bad = make("-n", "install", "CUDA=cu999", venv)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "CUDA=cu999" in bad.stderr
