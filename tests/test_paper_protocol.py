"""The paper profile's evaluation protocol (issue 22, items 1-4 and 12): a null reference is refused, own statistics
are a labelled choice, labels are random, guidance is combined in fp32, features are extracted in full fp32 whatever
the process's TF32 and autocast settings, and every protocol block names the profile and data set it came from."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from aligntok.config import ConfigError, load_params
from aligntok.diffusion.sampler import combine_cfg, guided_velocity
from aligntok.models.dit import build_dit
from tests.conftest import ROOT, SMOKE

PAPER = ROOT / "profiles" / "imagenet256.yaml"
U32 = 2.0 ** -24  # fp32 unit roundoff


def test_paper_profile_refuses_a_null_reference_with_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "aligntok.cli", "evaluate", "--params", str(PAPER),
                           "-S", "eval.reference=null"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aligntok: config error: eval.reference: given None;")
    assert "VIRTUAL_imagenet256_labeled.npz" in lines[0] and "https://openaipublic.blob.core.windows.net/" in lines[0]
    assert "'own'" in lines[0]


def test_own_statistics_are_an_explicit_choice_recorded_in_the_protocol():
    from aligntok.stages.common import feature_extractor
    from aligntok.stages.evaluate import protocol_of

    paper = load_params(PAPER, ["eval.reference=own"], check_paths=False)
    assert paper.eval.reference == "own"
    smoke = load_params(SMOKE)
    extractor = feature_extractor(smoke)
    own = protocol_of(smoke, extractor, {"name": "synthetic-train", "count": 900, "stats": "train-split",
                                         "features": [0] * 900})
    adm = protocol_of(smoke, extractor, {"name": "VIRTUAL_imagenet256_labeled.npz", "count": 10000, "stats": "stored",
                                         "features": [0] * 10000})
    assert own["reference_choice"] == "own" and adm["reference_choice"] == "file"


def test_a_reference_file_that_does_not_exist_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^eval.reference: given 'no/such.npz'; expected an existing path"):
        load_params(SMOKE, ["eval.reference=no/such.npz"])


def test_paper_profile_samples_random_labels_fp32_and_records_them():
    from aligntok.stages.common import feature_extractor
    from aligntok.stages.evaluate import protocol_of

    paper = load_params(PAPER, check_paths=False)
    assert (paper.eval.labels, paper.eval.amp) == ("random", False)
    smoke = load_params(SMOKE, ["eval.labels=random"])
    assert protocol_of(smoke, feature_extractor(smoke), None)["labels"] == "random"
    balanced = load_params(PAPER, ["eval.labels=balanced"], check_paths=False)
    assert balanced.eval.labels == "balanced"  # still an option


@pytest.mark.numeric
@pytest.mark.parametrize("cfg_channels", [None, 3])
def test_cfg_of_bf16_outputs_is_the_fp32_combination(cfg_channels):
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(4, 8, 5, 5, generator=g).bfloat16()
    uncond = (cond.float() + 0.05 * torch.randn(4, 8, 5, 5, generator=g)).bfloat16()
    scale = 10.0
    exact = uncond.double() + scale * (cond.double() - uncond.double())  # float64 of the same bf16 inputs
    out = combine_cfg(cond, uncond, scale, cfg_channels)
    assert out.dtype == torch.float32
    guided = slice(None) if cfg_channels is None else slice(0, cfg_channels)
    # cond - uncond of two bf16 values is exact in fp32; the product and the sum round once each: <= 2 u (|s d| + |u|),
    # doubled for slack
    bound = 4 * U32 * (scale * (cond.double() - uncond.double()).abs() + uncond.double().abs())
    assert ((out.double() - exact).abs() <= bound)[:, guided].all()
    if cfg_channels is not None:
        assert torch.equal(out[:, cfg_channels:], cond[:, cfg_channels:].float())  # the conditional output, exactly
    # what combining in bf16 gave: its rounding, amplified by the scale, is far outside fp32 rounding
    in_bf16 = (uncond + scale * (cond - uncond)).double()
    assert ((in_bf16 - exact).abs() > 100 * bound)[:, guided].any()


@pytest.mark.numeric
def test_guided_velocity_of_a_bf16_dit_is_fp32():
    torch.manual_seed(0)
    dit = build_dit("tiny", input_size=4, in_channels=4, num_classes=3, class_dropout_prob=0.1).eval()
    x, y = torch.randn(2, 4, 4, 4), torch.tensor([0, 2])
    kw = dict(cfg_scale=10.0, cfg_channels=None, cfg_interval_start=0.0, null_class=3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        v = guided_velocity(dit, x, 0.5, y, **kw)
        both = dit(torch.cat([x, x]), torch.full((4,), 0.5), torch.cat([y, torch.full_like(y, 3)]))
    assert both.dtype == torch.bfloat16 and v.dtype == torch.float32
    cond, uncond = both.double().chunk(2)
    exact = uncond + 10.0 * (cond - uncond)
    bound = 4 * U32 * (10.0 * (cond - uncond).abs() + uncond.abs())  # as in the test above
    assert ((v.double() - exact).abs() <= bound).all()


@pytest.fixture
def tf32_flags():
    """Restores the process-wide TF32 settings a test changes."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


def extractor_and_images():
    from aligntok.stages.common import feature_extractor
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return feature_extractor(load_params(SMOKE)).to(device), images


@pytest.mark.parametrize("tf32", [True, False])
def test_extraction_runs_without_tf32_or_autocast_and_restores_the_flags(tf32, tf32_flags):
    extractor, images = extractor_and_images()
    seen = []
    extractor.net.conv_stem.register_forward_pre_hook(lambda m, a: seen.append(
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.is_autocast_enabled("cpu"))))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        extractor(images)
    assert seen == [(False, False, False)]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32)


@pytest.mark.numeric
def test_features_do_not_depend_on_the_process_tf32_or_autocast_settings(tf32_flags):
    extractor, images = extractor_and_images()
    runs = []
    for tf32, autocast in ((False, False), (True, False), (True, True)):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            runs.append(extractor(images))
    for feats, logits in runs[1:]:
        # the same fp32 computation each time (on a GPU too: TF32 or bf16 would move features by ~1e-3 relative)
        torch.testing.assert_close(feats, runs[0][0], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(logits, runs[0][1], rtol=1e-6, atol=1e-9)


def test_protocol_names_profile_and_data_and_summary_reads_them_from_the_outputs(tmp_path):
    from aligntok.stages.common import feature_extractor, provenance
    from aligntok.stages.evaluate import protocol_of

    ci = load_params(ROOT / "profiles" / "ci.yaml")
    protocol = protocol_of(ci, feature_extractor(ci), None)
    assert protocol["profile"] == "ci" and protocol == {**protocol, **provenance(ci)}
    assert protocol["data"].startswith("synthetic: synthetic shapes, 32 px, 10 classes")
    # outputs made under the ci profile, read while params.yaml is the smoke profile
    shutil.copy(SMOKE, tmp_path / "params.yaml")
    (tmp_path / "outputs" / "metrics").mkdir(parents=True)
    (tmp_path / "outputs" / "protocol").mkdir(parents=True)
    (tmp_path / "outputs/metrics/evaluate.json").write_text(json.dumps(
        {"gfid": 12.5, "gfid_cfg": 9.5, "protocol": {"num_samples": 40, "feature_dim": 320, "cfg_scale": 2.0}}))
    strings = {k: v for k, v in protocol.items() if isinstance(v, str)}
    strings["linear_probe"] = "n/a: 1 of 10 classes have fewer than eval.probe_per_class=10 train images"
    (tmp_path / "outputs/protocol/evaluate.json").write_text(json.dumps({"protocol": strings}))
    out = subprocess.run([sys.executable, "-m", "aligntok.cli", "summary"], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "results of profile 'ci'" in out.stdout and "smoke" not in out.stdout
    assert "data: synthetic: synthetic shapes, 32 px" in out.stdout
    assert "| gfid_cfg | 9.5 |" in out.stdout and ", CFG 2 |" in out.stdout  # CFG of the run, not of params.yaml
    assert "| linear_probe_acc | n/a | 1 of 10 classes" in out.stdout
