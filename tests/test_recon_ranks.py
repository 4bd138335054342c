"""The tokenizer's end-of-stage measurement (rFID, PSNR, SSIM, LPIPS, semantic cosine): every module it runs sits on
the rank's device, the val images are split over the ranks in whole batches (2 gloo ranks give the 1-rank numbers),
and its numbers reach MLflow as val_<name>, off the training curves, while the metrics file keeps the plain names."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from tests.conftest import ROOT


@pytest.mark.parametrize("n,batch", [(0, 4), (3, 4), (10, 4), (40, 16), (41, 16), (64, 16)])
def test_rank_images_are_whole_batches_disjoint_and_complete(n, batch):
    from aligntok.eval.reconstruction import rank_images
    for world in (1, 2, 3, 5):
        parts = [rank_images(n, batch, r, world) for r in range(world)]
        assert [i for p in parts for i in p] == list(range(n))  # in rank order: image order, each image once
        # contiguous runs of whole batches, so every batch k is the 1-rank batch k
        assert all(p.step == 1 and p.start % batch == 0 and (p.stop == n or p.stop % batch == 0) for p in parts)


def _params_and_stage1(tmp_path, monkeypatch):
    """The ci profile, run in tmp_path, with a random-init tokenizer exported as stages 1 and 3."""
    from aligntok.config import load_params
    from aligntok.models.tokenizer import AlignTokenizer
    from aligntok.stages.common import tokenizer_dir
    from aligntok.stages.tokenizer import tokenizer_config

    params = load_params(ROOT / "profiles" / "ci.yaml")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    tokenizer = AlignTokenizer(tokenizer_config(params))
    for stage in (1, 3):
        tokenizer.save_pretrained(tokenizer_dir(stage))
    return params


def _off_device(module: torch.nn.Module, device: torch.device) -> list[str]:
    tensors = [*module.named_parameters(), *module.named_buffers()]
    assert tensors, "a module without weights says nothing about its placement"
    return [name for name, t in tensors if t.device != device]


def test_every_module_the_measurement_runs_is_on_the_rank_device(tmp_path, monkeypatch):
    """`meta` stands for the rank's GPU: built on the CPU, a module the stage forgets to move stays there. Both ways
    the stage gets its modules are covered: built here, and reused from training (stage 2's frozen stage-1 target,
    the training LPIPS) or from evaluate (its extractor), handed over on the CPU."""
    from aligntok.losses import build_lpips
    from aligntok.stages.common import feature_extractor
    from aligntok.stages.tokenizer import load_tokenizer, measurement_modules

    params = _params_and_stage1(tmp_path, monkeypatch)
    meta = torch.device("meta")
    cpu = torch.device("cpu")
    built = {stage: measurement_modules(params, stage, meta) for stage in (1, 3)}
    reused = measurement_modules(params, 2, meta, target=load_tokenizer(1, cpu), extractor=feature_extractor(params),
                                 lpips_fn=build_lpips(params.lpips.net, params.lpips.pretrained_backbone))
    assert set(built[1]) == {"extractor", "lpips_fn"}  # stage 1 is its own reference
    assert set(built[3]) == set(reused) == {"extractor", "lpips_fn", "reference"}
    for case, mods in [*built.items(), ("reused", reused)]:
        for name, module in mods.items():
            assert not _off_device(module, meta), (case, name, _off_device(module, meta))
    measured = load_tokenizer(3, meta)  # what evaluate measures
    assert not _off_device(measured, meta)
    assert not measured.training and not any(p.requires_grad for p in measured.parameters())


def test_val_metrics_go_to_mlflow_as_val_keys_and_the_file_keeps_its_names(tmp_path, isolated_mlflow):
    """A real sqlite store. The training curve `lpips` has its point at step 7; the val LPIPS measured after that step
    must not become a second point on that curve. evaluate has no training curve: its keys stay plain (compare and
    study read them)."""
    from aligntok.config import load_params
    from aligntok.stages.common import write_metrics
    from aligntok.tracking import stage_run

    params = load_params(ROOT / "profiles" / "ci.yaml")
    final = {"psnr": 21.5, "lpips": 0.125, "rfid": 3.5, "num_images": 16, "steps": 7, "fid_backbone": "x"}
    with stage_run(params, "tokenizer-stage2") as tracker:
        tracker.log_metrics({"lpips": 0.5, "loss": 1.0}, step=7)
        write_metrics("tokenizer-stage2", final, tracker, step=7)
        stage_id = tracker.run_id
    with stage_run(params, "evaluate") as tracker:
        write_metrics("evaluate", {"psnr": 20.0, "gfid": 9.0}, tracker)
        evaluate_id = tracker.run_id
    client = mlflow.MlflowClient(isolated_mlflow)

    def history(run_id, key):
        return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
    assert set(client.get_run(stage_id).data.metrics) == {"lpips", "loss", "val_psnr", "val_lpips", "val_rfid",
                                                          "val_num_images", "val_steps"}
    assert history(stage_id, "lpips") == [(7, 0.5)]  # the training curve alone
    assert history(stage_id, "val_lpips") == [(7, 0.125)] and history(stage_id, "val_psnr") == [(7, 21.5)]
    assert set(client.get_run(evaluate_id).data.metrics) == {"psnr", "gfid"}
    on_disk = json.loads((tmp_path / "outputs/metrics/tokenizer-stage2.json").read_text())
    assert on_disk == {"psnr": 21.5, "lpips": 0.125, "rfid": 3.5, "num_images": 16, "steps": 7}
    assert json.loads((tmp_path / "outputs/protocol/tokenizer-stage2.json").read_text()) == {"fid_backbone": "x"}


# 320 images: 41 in the val split; 40 measured in batches of 16 ([0, 16), [16, 32), [32, 40)): rank 0 scores the
# first batch, rank 1 the other two. One loader worker decodes them on each rank.
STAGE = ["-S", "data.num_images=320", "-S", "tokenizer.eval_images=40", "-S", "tokenizer.stage1.steps=4",
         "-S", "launcher.device=cpu", "-S", "data.num_workers=1"]


@pytest.mark.slow
def test_a_two_rank_stage_measures_the_one_rank_numbers_and_logs_them_off_the_curves(tmp_path, isolated_mlflow,
                                                                                      one_thread):
    from aligntok.config import load_params
    from aligntok.eval.coord import Coord
    from aligntok.stages.tokenizer import load_tokenizer, measure

    (tmp_path / "params.yaml").write_text((ROOT / "profiles" / "ci.yaml").read_text())
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("ALIGNTOK_", "PREFECT_"))},
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ALIGNTOK_PIPELINE_ID": "recon-ranks"}
    for cmd in (["prepare", *STAGE[:2]], ["tokenizer-stage1", "-S", "launcher.nproc_per_node=2", *STAGE]):
        proc = subprocess.run([sys.executable, "-m", "aligntok.cli", *cmd], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "outputs/metrics/tokenizer-stage1.json").read_text())
    params = load_params(tmp_path / "params.yaml", [STAGE[i + 1] for i in range(0, len(STAGE), 2)])
    # one rank, in this process, no loader worker, on the exported model (ci: no EMA, so the model measured above)
    one = measure(params, load_tokenizer(1, torch.device("cpu")), 1, torch.device("cpu"), Coord(), 0)
    assert one["num_images"] == two["num_images"] == 40
    for k in ("psnr", "ssim", "lpips", "semantic_cosine", "rfid"):
        # Each image is scored in the same batch of 16 on either layout, with the same one-thread arithmetic, and rank
        # 0 sums the per-image values and stacks the feature rows in image order: bit-identical by construction.
        # Any tolerance would be arbitrary; one image dropped or scored twice moves each mean by ~1/40.
        assert one[k] == two[k], (k, one[k], two[k])

    client = mlflow.MlflowClient(isolated_mlflow)
    run, = [r for r in client.search_runs([client.get_experiment_by_name("aligntok").experiment_id])
            if r.data.tags.get("stage") == "tokenizer-stage1"]
    with open(tmp_path / "outputs/plots/tokenizer-stage1.csv") as f:
        curve = [(int(row["step"]), float(row["lpips"])) for row in csv.DictReader(f)]
    assert curve and curve[-1][0] == 4  # the training curve has its own point at the last step
    got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "lpips"))
    assert [s for s, _ in got] == [s for s, _ in curve]  # one point per logged step: no val point on the curve
    assert [v for _, v in got] == pytest.approx([v for _, v in curve], rel=1e-12)  # the same float64 both ways
    for k in ("psnr", "lpips", "rfid", "semantic_cosine"):
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"val_{k}")] == [(4, two[k])]
        assert k == "lpips" or k not in run.data.metrics
