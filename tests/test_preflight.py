"""Preflight: every stage resolves its weights before step 0, `aligntok preflight` checks a profile, and the
multi-node pitfalls (sqlite MLflow and DVC's lock on network file systems, gloo on loopback) are found from a mount
table, a config and an address given as input."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aligntok.config import load_params
from aligntok.multinode import dvc_lock, fs_type, mlflow_store, parse_mounts, rendezvous_address
from aligntok.preflight import PreflightError, cuda_check, profile_checks, require_stage, weight_needs
from aligntok.preflight_disk import disk_estimate, parameter_counts
from tests.conftest import ROOT

PAPER = ROOT / "profiles" / "imagenet256.yaml"
CI = ROOT / "profiles" / "ci.yaml"

# a cluster node's /proc/mounts: local root, Lustre scratch, an NFS home with a space in a mount point, GPFS
MOUNTS = """\
/dev/nvme0n1p2 / ext4 rw,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
10.1.0.2@o2ib:/scratch /scratch lustre rw,flock,lazystatfs 0 0
nfs01:/export/home /home nfs4 rw,relatime,vers=4.2 0 0
nfs01:/export/team /home/team\\040data nfs rw,relatime,vers=3 0 0
/dev/nvme1n1 /scratch/local xfs rw,relatime 0 0
gpfs0 /gpfs gpfs rw,relatime 0 0
"""


def _tiny_folder(root: Path) -> Path:
    from PIL import Image
    for c in ("n01", "n02"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 40), (60 * i, 100, 200)).save(root / c / f"{i}.png")
    return root


def _offline_env(tmp_path: Path) -> dict[str, str]:
    """Offline, with empty weight caches (HF hub and torch hub) of the test's own."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "TORCH_HOME": str(tmp_path / "torch"),
            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_stage_fails_in_one_line_before_step_0_when_weights_are_offline(tmp_path):
    """The paper profile's stage 1 on a tiny image folder, offline with empty caches: exit 2, one line naming the
    encoder weights, and no step taken (no checkpoint, outputs, tracking store)."""
    images = _tiny_folder(tmp_path / "images")
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "aligntok.cli", "tokenizer-stage1", "--params", str(PAPER),
         "-S", f"data.root={images}", "-S", f"data.val_root={images}", "-S", "eval.reference=own",
         "-S", "launcher.device=cpu", "-S", "launcher.nproc_per_node=1"],
        cwd=work, env=_offline_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("aligntok: tokenizer-stage1: preflight: encoder.pretrained:")
    assert "vit_large_patch14_dinov2" in lines[0] and "(and 2 more" in lines[0]  # LPIPS's VGG and Inception
    assert list(work.iterdir()) == []  # no checkpoints/, outputs/, mlruns or mlflow.db: nothing ran
    assert "step" not in proc.stdout


def test_stage_needs_follow_what_each_stage_loads():
    p = load_params(PAPER, check_paths=False)
    assert set(weight_needs("tokenizer-stage1", p)) == {"encoder.pretrained", "lpips.pretrained_backbone",
                                                        "eval.fid_backbone"}
    # stages 2 and 3 start from the saved tokenizer: no encoder download
    assert set(weight_needs("tokenizer-stage2", p)) == {"lpips.pretrained_backbone", "eval.fid_backbone"}
    assert weight_needs("prepare", p) == weight_needs("cache-latents", p) == weight_needs("sample", p) == {}
    assert set(weight_needs("evaluate", p)) == {"lpips.pretrained_backbone", "eval.fid_backbone"}
    assert weight_needs("train-dit", p) == {}  # the judge is a stage output: train-dit loads it before step 0
    vae = load_params(PAPER, ["tokenizer.kind=vae"], check_paths=False)
    assert "encoder.pretrained" not in weight_needs("tokenizer-stage1", vae)  # the from-scratch baseline


def test_require_stage_passes_on_the_ci_profile_and_names_a_missing_local_file(tmp_path):
    ci = load_params(CI, check_paths=False)
    require_stage("tokenizer-stage1", ci)  # everything ships with the packages
    missing = tmp_path / "dinov2.safetensors"
    bad = ci.model_copy(update={"encoder": ci.encoder.model_copy(update={"pretrained": str(missing)})})
    with pytest.raises(PreflightError, match=f"^encoder.pretrained: weights file not found: {missing}$"):
        require_stage("tokenizer-stage1", bad)
    require_stage("tokenizer-stage2", bad)  # stage 2 never reads the encoder file


def test_hub_encoder_resolves_to_the_cached_file_that_build_encoder_loads(tmp_path):
    """A filled HF hub cache (the layout huggingface_hub writes) of timm's tiny test ViT, offline: preflight's
    resolution returns the cached file, and the encoder the stage builds holds exactly its tensors."""
    import timm
    import torch
    from safetensors.torch import save_file
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model("test_vit", pretrained=False).state_dict().items()}
    repo = tmp_path / "hf" / "hub" / "models--timm--test_vit.r160_in1k"
    snapshot = repo / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    save_file(state, str(snapshot / "model.safetensors"))
    torch.save(state["blocks.0.attn.qkv.weight"], tmp_path / "qkv.pt")
    script = (
        "import torch; from aligntok.models.encoder import build_encoder, resolve_encoder_weights\n"
        "print(resolve_encoder_weights('test_vit', 'hub'))\n"
        "enc = build_encoder('test_vit', 'hub', 64)\n"
        f"qkv = torch.load(r'{tmp_path / 'qkv.pt'}')\n"
        "print(torch.equal(enc.backbone.state_dict()['blocks.0.attn.qkv.weight'], qkv))\n")
    proc = subprocess.run([sys.executable, "-c", script], env=_offline_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(snapshot / "model.safetensors"), "True"]


def test_mount_table_parsing_and_longest_mount_point():
    assert ("/home/team data", "nfs") in parse_mounts(MOUNTS)
    assert fs_type("/scratch/u1/aligntok", MOUNTS) == "lustre"
    assert fs_type("/scratch/local/tmp", MOUNTS) == "xfs"  # a local disk mounted inside the Lustre tree
    assert fs_type("/home/team data/x", MOUNTS) == "nfs"
    assert fs_type("/home/u1", MOUNTS) == "nfs4"
    assert fs_type("/opt/x", MOUNTS) == "ext4"
    assert fs_type("/x", "") == "unknown"


def test_sqlite_tracking_store_on_a_network_file_system():
    ok, line = mlflow_store("sqlite:////gpfs/proj/aligntok/mlflow.db", MOUNTS)
    assert not ok and "gpfs" in line and "mlflow server" in line and "tracking.uri=http://" in line
    assert mlflow_store("sqlite:////scratch/local/mlflow.db", MOUNTS)[0]
    assert mlflow_store("http://tracker:5000", MOUNTS)[0]


def _dvc_repo(root: Path, core: str = "") -> Path:
    (root / ".dvc").mkdir(parents=True)
    (root / ".dvc" / "config").write_text(f"[cache]\n    type = hardlink,symlink\n[core]\n    autostage = true\n{core}"
                                          "['remote \"store\"']\n    url = /scratch/dvc-store\n")
    return root


def test_dvc_lock_on_lustre_needs_hardlink_lock(tmp_path):
    mounts = f"{MOUNTS}scratch:/fs {tmp_path} lustre rw 0 0\n"
    ok, line = dvc_lock(_dvc_repo(tmp_path / "a"), mounts)
    assert not ok and "lustre" in line and "`dvc config core.hardlink_lock true`" in line
    assert dvc_lock(_dvc_repo(tmp_path / "b", "    hardlink_lock = true\n"), mounts)[0]
    local = _dvc_repo(tmp_path / "c")
    (local / ".dvc" / "config.local").write_text("[core]\n    hardlink_lock = True\n")
    assert dvc_lock(local, mounts)[0]
    assert dvc_lock(_dvc_repo(tmp_path / "d"), f"/dev/sda1 {tmp_path} ext4 rw 0 0\n")[0]


def test_loopback_hostname_with_several_nodes():
    ok, line = rendezvous_address("127.0.1.1", 2, {})
    assert not ok and "GLOO_SOCKET_IFNAME" in line and "NCCL_SOCKET_IFNAME" in line
    assert rendezvous_address("127.0.1.1", 2, {"GLOO_SOCKET_IFNAME": "ib0"})[0]
    assert rendezvous_address("127.0.1.1", 1, {})[0]
    assert rendezvous_address("10.2.0.17", 4, {})[0]


def test_profile_checks_find_each_problem_of_a_cluster_setup(tmp_path, monkeypatch):
    """The CI profile run as if from a Lustre project folder with 2 nodes on a loopback hostname: the tracking store,
    DVC's lock, the missing reference and (when the host resolves to loopback) the rendezvous fail; the rest pass."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = _dvc_repo(tmp_path / "proj")
    p = load_params(CI, ["eval.reference=missing.npz", "launcher.nnodes=2", "launcher.rdzv_endpoint=n0:29500",
                         f"tracking.uri=sqlite:///{project}/mlflow.db"], check_paths=False)
    checks = {c.name: c for c in profile_checks(p, CI, ["tokenizer-stage1", "evaluate"], project=project,
                                                mounts_text=f"{MOUNTS}fs {tmp_path} lustre rw 0 0\n", env={})}
    failed = {n for n, c in checks.items() if not c.ok}
    assert {"mlflow store", "dvc lock", "eval.reference"} <= failed
    assert failed <= {"mlflow store", "dvc lock", "eval.reference", "rendezvous"}
    assert checks["project folder"].ok and "lustre" in checks["project folder"].detail
    assert all("\n" not in c.detail for c in checks.values())


def test_cuda_check_reports_versions_and_refuses_a_cuda_profile_without_gpus():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    c = cuda_check(load_params(CI, check_paths=False))
    assert c.ok and f"torch {torch.__version__}" in c.detail and "CUDA build" in c.detail and "driver" in c.detail
    c = cuda_check(load_params(PAPER, check_paths=False))  # launcher.device: cuda
    assert not c.ok and "launcher.device" in c.detail


def test_disk_estimate_of_the_paper_profile_counts_the_folder_and_the_models(tmp_path):
    images = _tiny_folder(tmp_path / "images")
    p = load_params(PAPER, [f"data.root={images}"], check_paths=False)
    tok, dit = parameter_counts(p)
    assert 304e6 < tok < 450e6  # DINOv2-L/14 (304M) + adapter + the LDM decoder
    assert 670e6 < dit < 700e6  # LightningDiT-XL/1: DiT-XL's 675M, on 32 latent channels
    need, how = disk_estimate(p, PAPER.parent, ROOT)
    assert how.startswith("4 train images (files in 2 of 2 class folders)")
    images_b, latents_b = 4 * 256 * 256 * 3 * 0.6, 4 * 2 * 32 * 16 * 16 * 4  # PNG shards; fp32 latents, flipped too
    ckpts, samples = 2 * 16 * (3 * tok + dit), 2 * 2 * 50_000 * 256 * 256 * 3
    assert need == int(images_b + latents_b + ckpts + samples)  # this repository's DVC cache links: no second copy


def test_preflight_cli_passes_on_the_ci_profile(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "aligntok.cli", "preflight", "--params", str(CI)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = proc.stdout.strip().splitlines()
    assert rows[0].split() == ["check", "result", "detail"]
    assert {r.split()[0] for r in rows[1:-1]} >= {"weights", "data.root", "eval.reference", "cuda", "disk",
                                                   "project", "mlflow", "dvc", "rendezvous"}
    assert all("  ok  " in r for r in rows[1:-1]), proc.stdout
    assert rows[-1] == f"preflight: {len(rows) - 2} of {len(rows) - 2} checks pass"


T2I = ROOT / "profiles" / "t2i-smoke.yaml"


def test_text_profile_checks_the_text_encoder_clip_and_prompt_files(tmp_path):
    params = load_params(T2I)
    assert set(weight_needs("cache-text", params)) == {"text.encoder"}
    assert "text.encoder" in weight_needs("evaluate", params) and "text.encoder" not in weight_needs("train-dit", params)
    assert "text.encoder" not in weight_needs("cache-text", load_params(CI))  # the class task encodes no captions
    require_stage("cache-text", params)  # the packaged offline encoder resolves
    checks = {c.name: c for c in profile_checks(params, T2I, ["cache-text", "evaluate"], mounts_text=MOUNTS)}
    assert checks["weights text.encoder"].ok and checks["text.prompts"].ok and checks["text.prompt_images"].ok
    missing = params.model_copy(update={"text": params.text.model_copy(update={
        "encoder": str(tmp_path / "no-encoder"), "clip_model": str(tmp_path / "no-clip"),
        "prompts": str(tmp_path / "prompts.txt")})})
    with pytest.raises(PreflightError, match=r"^text\.encoder: .*no-encoder.*\(and 1 more"):
        require_stage("evaluate", missing)
    checks = {c.name: c for c in profile_checks(missing, T2I, ["evaluate"], mounts_text=MOUNTS)}
    for name in ("weights text.encoder", "weights text.clip_model", "text.prompts"):
        assert not checks[name].ok and "\n" not in checks[name].detail, name


def test_cache_text_with_a_missing_encoder_stops_in_one_line_before_any_work(tmp_path):
    (tmp_path / "params.yaml").write_text(T2I.read_text())
    proc = subprocess.run([sys.executable, "-m", "aligntok.cli", "cache-text", "-S", f"text.encoder={tmp_path / 'x'}"],
                          cwd=tmp_path, env=_offline_env(tmp_path), capture_output=True, text=True, timeout=600)
    said = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(said) == 1 and "text.encoder" in said[0], proc.stderr[-2000:]
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "data").exists()
