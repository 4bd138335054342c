"""`aligntok evaluate` as real processes on tiny random-init models: 2 ranks (torchrun, gloo on CPU) give the
1-rank numbers, a SIGKILLed run resumes from its sample parts, an ADM reference batch's stored mu/sigma are used
as stored, and a malformed reference is one line with exit code 2.

The models are built directly (random init, the project's own save functions) on ci-profile data, so a run
costs seconds: what is under test is the bookkeeping around the metrics, not their values.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT

# 40 samples in parts of 4 (10 parts per variant, 20 in all), 2 Euler steps: seconds per run on 2 cores
FAST = ["-S", "eval.num_samples=40", "-S", "eval.batch_size=4", "-S", "sample.steps=2", "-S", "launcher.device=cpu",
        "-S", "tokenizer.eval_images=8"]
# Same per-part arithmetic in every process (torchrun also sets 1 thread per worker), so 1 and 2 ranks compute
# bit-identical parts; what may differ is only the float64 summation order of the reference statistics.
ENV = {"OMP_NUM_THREADS": "1", "ALIGNTOK_TRACKING": "0", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALIGNTOK_", "PREFECT_"))}
    return {**env, **ENV}


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "aligntok.cli", *args]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """ci-profile data and judge, plus random-init tokenizer (stage 1 = stage 3) and a tiny DiT, in the stage
    layout."""
    from aligntok.config import load_params
    from aligntok.models.dit_export import save_dit
    from aligntok.models.dit import build_dit
    from aligntok.models.tokenizer import AlignTokenizer
    from aligntok.fingerprint import tokenizer_hash
    from aligntok.stages.tokenizer import tokenizer_config

    base = tmp_path_factory.mktemp("evaluate") / "base"
    base.mkdir()
    shutil.copyfile(ROOT / "profiles" / "ci.yaml", base / "params.yaml")
    for stage in ("prepare", "judge"):
        proc = subprocess.run(_cli(stage), cwd=base, env=_env(), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    params = load_params(base / "params.yaml")
    torch.manual_seed(0)
    tok = AlignTokenizer(tokenizer_config(params))
    for stage in (1, 3):
        tok.save_pretrained(base / f"outputs/tokenizer/stage{stage}/model")
    c, g = tok.latent_channels, tok.grid_size
    dit = build_dit("tiny", input_size=g, in_channels=c, num_classes=params.data.num_classes)
    with torch.no_grad():  # DiT zero-inits its output and adaLN layers: without this, v = 0 and CFG does nothing
        for w in dit.parameters():
            w.add_(0.05 * torch.randn_like(w))
    save_dit(dit, base / "outputs/dit/model", {
        "model": "tiny", "input_size": g, "in_channels": c, "num_classes": params.data.num_classes, "qk_norm": False,
        "latent_stats": {"mean": [0.0] * c, "std": [1.0] * c},
        "tokenizer_hash": tokenizer_hash(base / "outputs/tokenizer/stage3/model")})
    return base


def clone(workdir: Path, dest: Path) -> Path:
    shutil.copytree(workdir, dest)
    return dest


def evaluate(cwd: Path, *extra: str, ranks: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = _cli("evaluate", *FAST, "-S", f"launcher.nproc_per_node={ranks}", *extra)
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def metrics(cwd: Path) -> dict:
    return json.loads((cwd / "outputs/metrics/evaluate.json").read_text())


def protocol(cwd: Path) -> dict:
    """The strings of the metrics record (backbones, reference names), kept apart from the DVC metrics."""
    return json.loads((cwd / "outputs/protocol/evaluate.json").read_text())


def parts(cwd: Path) -> list[Path]:
    return sorted((cwd / "checkpoints/evaluate").glob("*/part-*.npz"))


@pytest.fixture(scope="module")
def one_rank(workdir, tmp_path_factory) -> tuple[Path, float]:
    cwd = clone(workdir, tmp_path_factory.mktemp("one") / "w")
    t0 = time.perf_counter()
    proc = evaluate(cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return cwd, time.perf_counter() - t0


SCORES = ["gfid", "is", "precision", "recall", "gfid_cfg", "is_cfg", "precision_cfg", "recall_cfg", "rfid", "psnr",
          "ssim", "lpips", "semantic_cosine", "fd_judge", "class_acc_judge", "fd_judge_cfg", "class_acc_judge_cfg",
          "linear_probe_acc"]


def assert_same_scores(a: dict, b: dict) -> None:
    for k in SCORES:
        if k.startswith("gfid"):
            # The reference statistics are float64 sums whose order depends on the rank layout (~1e-16 relative).
            # The covariances are rank-deficient (143 train images, 320-d features), and the square root's null
            # eigenvalues turn that into ~sqrt(1e-16) = 1e-8 of the eigenvalue scale: measured 1e-10 relative.
            # One different sample of the 40 would move FID by orders of magnitude more than 1e-7.
            np.testing.assert_allclose(a[k], b[k], rtol=1e-7, atol=0, err_msg=k)
        else:
            # IS, precision/recall and the reconstruction metrics see bit-identical inputs in the same order
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=0, err_msg=k)
    assert a["protocol"] == b["protocol"]


@pytest.mark.slow
def test_two_ranks_give_the_one_rank_metrics(workdir, one_rank, tmp_path):
    cwd1, wall1 = one_rank
    cwd2 = clone(workdir, tmp_path / "w")  # nothing cached: reference statistics and parts made on 2 ranks
    t0 = time.perf_counter()
    proc = evaluate(cwd2, ranks=2)
    wall2 = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    m1, m2 = metrics(cwd1), metrics(cwd2)
    assert_same_scores(m1, m2)
    assert m2["run"]["ranks"] == 2 and m1["run"]["ranks"] == 1
    assert m2["run"]["generated"] == {"": 40, "_cfg": 40}
    assert "ranks" not in m2["protocol"] and "world_size" not in m2["protocol"]
    assert m1["sample_s_per_image"] > 0 and m1["sample_s_per_image_cfg"] > 0
    # the samples file is the same too: parts of sample i depend on (seed, i) only
    for name in ("samples.npz", "samples_cfg.npz"):
        with np.load(cwd1 / "outputs/eval" / name) as a, np.load(cwd2 / "outputs/eval" / name) as b:
            assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    print(f"evaluate wall time: 1 rank {wall1:.1f}s, 2 ranks {wall2:.1f}s; "
          f"{m1['sample_s_per_image']:.4f} s/sample, {m1['sample_s_per_image_cfg']:.4f} s/sample with CFG")


@pytest.mark.slow
def test_a_killed_evaluate_resumes_from_its_parts(one_rank, workdir, tmp_path):
    cwd = clone(workdir, tmp_path / "w")
    cmd = _cli("evaluate", *FAST, "-S", "launcher.nproc_per_node=1")
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(parts(cwd)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    done = len(parts(cwd))
    assert 3 <= done < 20, f"{done} of 20 parts when killed"
    assert not (cwd / "outputs/metrics/evaluate.json").exists()
    rerun = evaluate(cwd)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    m = metrics(cwd)
    generated = sum(m["run"]["generated"].values())
    assert generated == 80 - 4 * done and sum(m["run"]["reused"].values()) == 4 * done
    assert_same_scores(m, metrics(one_rank[0]))


def _fake_inception(path: Path) -> Path:
    from tests.test_eval import FakeFidInception
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(FakeFidInception()), str(path))
    return path


@pytest.mark.slow
def test_adm_reference_batch_stats_are_used_as_stored(one_rank, tmp_path):
    from aligntok.eval.features import build_feature_extractor, extract
    from aligntok.eval.metrics import feature_stats, frechet_distance

    cwd = clone(one_rank[0], tmp_path / "w")  # its parts are reused: only their features are recomputed
    weights = _fake_inception(tmp_path / "inception-2015-12-05.pt")
    ex = build_feature_extractor("inception", str(weights))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    own_mu, own_sigma = feature_stats(extract(ex, images)[0])
    # stored statistics that are NOT those of arr_0: what ADM's file holds is whole-train statistics
    mu, sigma = own_mu + 0.5, own_sigma + np.diag(rng.uniform(0.5, 1.0, 2048))
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=images, mu=mu, sigma=sigma)
    proc = evaluate(cwd, "-S", "eval.fid_backbone=inception", "-S", f"eval.inception_weights={weights}",
                    "-S", "eval.feature_dim=null", "--reference", str(tmp_path / "VIRTUAL_ref.npz"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    m = metrics(cwd)
    assert m["run"]["generated"] == {"": 0, "_cfg": 0}
    assert protocol(cwd)["protocol"]["reference"] == "VIRTUAL_ref.npz (64 images)"
    assert protocol(cwd)["protocol"]["reference_stats"].startswith("stored mu/sigma")
    with np.load(cwd / "outputs/eval/samples.npz") as f:
        sample_mu, sample_sigma = feature_stats(extract(ex, f["arr_0"])[0])
    expected = frechet_distance(sample_mu, sample_sigma, mu, sigma)
    recomputed = frechet_distance(sample_mu, sample_sigma, own_mu, own_sigma)
    # the same float32 features up to batch composition (parts of 4 vs one batch): ~1e-7 relative per feature
    np.testing.assert_allclose(m["gfid"], expected, rtol=1e-5)
    assert abs(recomputed - expected) > 100 * 1e-5 * expected  # the check above can tell the two apart


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mu_shape", "images_dtype"])
def test_malformed_reference_batch_is_one_line_and_exit_2(workdir, tmp_path, case):
    cwd = clone(workdir, tmp_path / "w")
    weights = _fake_inception(tmp_path / "inception-2015-12-05.pt")
    images = np.zeros((8, 32, 32, 3), np.uint8 if case == "mu_shape" else np.float32)
    mu = np.zeros(10 if case == "mu_shape" else 2048)
    np.savez(tmp_path / "bad.npz", arr_0=images, mu=mu, sigma=np.eye(2048))
    proc = evaluate(cwd, "-S", "eval.fid_backbone=inception", "-S", f"eval.inception_weights={weights}",
                    "-S", "eval.feature_dim=null", "-S", f"eval.reference={tmp_path / 'bad.npz'}", timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("aligntok:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    expected = ("mu must be a float vector of 2048 features" if case == "mu_shape"
                else "arr_0 must be N x H x W x 3 uint8")
    assert f"bad.npz: {expected}" in lines[0]
    assert not parts(cwd)  # stopped before sampling anything
