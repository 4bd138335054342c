"""The study report from real MLflow runs (sqlite store), laid out as the stages log them: variants are told apart
by params, seeds are averaged with their spread, interrupted pipelines are left out, curves come from the
train-dit probe history. The end-to-end path (a real DAG run, then the report) is in tests/test_pipeline.py."""
import subprocess
import sys

import mlflow
import pytest

from tests.conftest import ROOT

VARIANT_PARAMS = {"a": {}, "b": {"tokenizer.stage2.steps": "0", "tokenizer.stage3.steps": "0"},
                  "c": {"tokenizer.stage2.semantic_weight": "0"}, "d": {"tokenizer.kind": "vae"}}


def log_pipeline(client, exp, pid, seed, variant, psnr, curve, finished=True, profile="smoke"):
    params = {"seed": str(seed), "tokenizer.kind": "aligntok", "tokenizer.stage2.steps": "100",
              "tokenizer.stage3.steps": "100", "tokenizer.stage2.semantic_weight": "1.0", **VARIANT_PARAMS[variant]}
    for stage in ("train-dit", "evaluate"):
        run = client.create_run(exp, tags={"stage": stage, "pipeline_id": pid, "mlflow.source.git.commit": f"c{seed}"})
        for k, v in params.items():
            client.log_param(run.info.run_id, k, v)
        if stage == "evaluate":
            client.log_dict(run.info.run_id, {"profile": profile, "data": "synthetic: synthetic shapes, 64 px",
                                              "models": "DiT tiny/2", "fid_backbone": "efficientnet-lite0"},
                            "protocol.json")
            client.log_metric(run.info.run_id, "psnr", psnr)
            client.log_metric(run.info.run_id, "class_acc_judge", 0.5)
        else:
            for step, value in curve:
                client.log_metric(run.info.run_id, "probe_fd", value, step=step)
                client.log_metric(run.info.run_id, "probe_class_acc", 1 / value, step=step)
        client.set_terminated(run.info.run_id, "FINISHED" if finished or stage == "train-dit" else "KILLED")


def test_report_groups_variants_and_seeds(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("study", artifact_location=str(tmp_path / "artifacts"))
    for seed, psnr in ((0, 20.0), (1, 22.0)):
        log_pipeline(client, exp, f"p-a{seed}", seed, "a", psnr, [(100, 4.0), (200, 2.0)])
    log_pipeline(client, exp, "p-d0", 0, "d", 18.0, [(100, 8.0), (200, 5.0)])
    log_pipeline(client, exp, "p-b0", 0, "b", 99.0, [(100, 1.0)], finished=False)  # interrupted: left out
    from tests.test_pipeline import isolated_env
    proc = subprocess.run([sys.executable, "-m", "aligntok.cli", "study-report", "--experiment", "study",
                           "--out", str(tmp_path / "rep"), "--command-line", "make study STUDY_SEEDS='0 1'"],
                          capture_output=True, text=True, env={**isolated_env(tmp_path), "MLFLOW_TRACKING_URI": uri}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (tmp_path / "rep" / "study.md").read_text()
    rows = {line.split("|")[1].strip()[:3]: line for line in report.splitlines() if line.startswith("| (")}
    assert set(rows) == {"(a)", "(d)"}
    # mean 21, sample standard deviation of (20, 22) = 1.41
    assert "| 2 | 21 ± 1.4 |" in rows["(a)"] and "| 1 | 18 ± 0 |" in rows["(d)"]
    assert "make study STUDY_SEEDS='0 1'" in report
    assert "3 pipelines at commit `c0`, `c1` (read from their MLflow runs)" in report  # the interrupted one is out
    # the profile comes from the runs' protocol; the report was made with params.yaml of whatever profile
    assert ("Profile **smoke**: data synthetic: synthetic shapes, 64 px; DiT tiny/2; FID-type metrics in "
            "efficientnet-lite0 feature space.") in report
    assert "not comparable" not in report
    for key in ("probe_fd", "probe_class_acc"):
        assert (tmp_path / "rep" / f"study_{key}.png").stat().st_size > 1000


def test_curve_means_and_spread_per_step():
    from aligntok.stages.study import summarise
    found = {("a", "0"): {"metrics": {}, "curves": {"probe_fd": [(10, 2.0), (20, 1.0)], "probe_class_acc": []}},
             ("a", "1"): {"metrics": {}, "curves": {"probe_fd": [(10, 4.0), (20, 1.0)], "probe_class_acc": []}}}
    _, curves = summarise(found)
    assert curves["a"]["probe_fd"] == [(10, 3.0, pytest.approx(2 ** 0.5, rel=1e-12)), (20, 1.0, 0.0)]


def test_a_pipelines_time_starts_at_its_first_stage(tmp_path):
    """The report's wall time counts tokenizer training too: a pipeline starts with its earliest run, not train-dit."""
    from aligntok.stages.study import collect
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("study", artifact_location=str(tmp_path / "artifacts"))  # not ./mlruns
    client.create_run(exp, tags={"stage": "prepare", "pipeline_id": "p-a0"}, start_time=1000)
    log_pipeline(client, exp, "p-a0", 0, "a", 20.0, [(100, 4.0)])
    found = collect(client.search_runs([exp]), lambda run_id, key: [])
    assert found[("a", "0")]["start"] == 1000 < found[("a", "0")]["end"]


def test_pipelines_of_two_profiles_are_named_and_flagged():
    from aligntok.stages.study import provenance
    found = {(v, "0"): {"protocol": {"profile": p, "data": "d", "models": "m", "fid_backbone": "b"}}
             for v, p in (("a", "smoke"), ("d", "ci"))}
    found[("b", "0")] = {}  # a run logged before protocols were: named, not dropped
    lines = provenance(found)
    assert lines[:3] == ["Profile **ci**: data d; m; FID-type metrics in b feature space.",
                         "Profile **smoke**: data d; m; FID-type metrics in b feature space.",
                         "Profile **unknown**: data unknown; unknown; FID-type metrics in unknown feature space."]
    assert "not comparable" in lines[3]


def test_curves_keep_a_real_step_0_probe_and_drop_points_logged_without_a_step(tmp_path):
    """MLflow stores a metric logged without a step at step 0. train-dit used to log its last probe that way after
    training, which put the trained model's score at step 0; the baseline probe of the untrained model is logged at
    step 0 before any later point. Only the second belongs on the curve."""
    from aligntok.stages.study import collect, stepped, summarise
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("study", artifact_location=str(tmp_path / "artifacts"))  # not ./mlruns
    curves = {}
    for name, baseline in (("new", True), ("old", False)):  # with a baseline probe; an old run without one
        run = client.create_run(exp).info.run_id
        if baseline:
            client.log_metric(run, "probe_fd", 9.0, timestamp=1000, step=0)
        client.log_metric(run, "probe_fd", 4.0, timestamp=2000, step=100)
        client.log_metric(run, "probe_fd", 2.0, timestamp=3000, step=200)
        client.log_metric(run, "probe_fd", 2.0, timestamp=4000)  # a summary without a step, logged last
        assert (0, 2.0) in [(m.step, m.value) for m in client.get_metric_history(run, "probe_fd")]  # MLflow's step 0
        curves[name] = stepped(client.get_metric_history(run, "probe_fd"))
    assert curves == {"new": [(0, 9.0), (100, 4.0), (200, 2.0)], "old": [(100, 4.0), (200, 2.0)]}
    # and through the report's own reader: two seeds of one variant, one with a baseline
    for seed, name in enumerate(curves):
        log_pipeline(client, exp, f"p-{name}", seed, "a", 20.0, [])
    runs = client.search_runs([exp])
    dit_runs = {r.data.tags["pipeline_id"]: r.info.run_id for r in runs if r.data.tags.get("stage") == "train-dit"}
    found = collect(runs, lambda run_id, key: curves["new" if run_id == dit_runs["p-new"] else "old"])
    _, summary = summarise(found)
    # step 0 has one seed (the baseline: 9.0, no spread), later steps two equal values; exact binary arithmetic
    assert summary["a"]["probe_fd"] == [(0, 9.0, 0.0), (100, 4.0, 0.0), (200, 2.0, 0.0)]
