"""MLflow tracking against a real sqlite store: parent/child runs across processes, outage tolerance."""
import subprocess
import sys
import textwrap
import warnings

import mlflow

from aligntok.config import load_params
from aligntok.tracking import Tracker, stage_run
from tests.conftest import ROOT

STAGE_SCRIPT = textwrap.dedent("""
    import sys
    from aligntok.config import load_params
    from aligntok.tracking import stage_run
    params = load_params(sys.argv[1])
    with stage_run(params, sys.argv[2]) as t:
        t.log_metrics({"loss": 1.5}, step=1)
        t.log_metrics({"loss": 0.5}, step=2)
""")


def test_two_stage_processes_share_one_parent(tmp_path, isolated_mlflow, monkeypatch):
    monkeypatch.setenv("ALIGNTOK_PIPELINE_ID", "pipe-123")
    for stage in ("prepare", "tokenizer-stage1"):
        subprocess.run([sys.executable, "-c", STAGE_SCRIPT, str(ROOT / "params.yaml"), stage], check=True,
                       cwd=ROOT)
    mlflow.set_tracking_uri(isolated_mlflow)
    runs = mlflow.search_runs(experiment_names=["aligntok"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("role") == "pipeline"]
    children = [r for r in runs if r.data.tags.get("role") != "pipeline"]
    assert len(parents) == 1 and parents[0].data.tags["pipeline_id"] == "pipe-123"
    assert sorted(r.data.tags["stage"] for r in children) == ["prepare", "tokenizer-stage1"]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    child = children[0]
    assert child.data.params["tokenizer.stage2.lr"] == str(load_params(ROOT / "params.yaml").tokenizer.stage2.lr)
    assert child.data.tags["profile"] == "smoke" and child.data.tags["git_commit"]
    history = mlflow.MlflowClient().get_metric_history(child.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 0.5)]


def test_resumed_stage_reopens_its_run(isolated_mlflow, monkeypatch):
    monkeypatch.setenv("ALIGNTOK_PIPELINE_ID", "pipe-resume")
    params = load_params(ROOT / "params.yaml")
    with stage_run(params, "train-dit") as t:
        first = t.run_id
        t.log_metrics({"loss": 2.0}, step=1)
    with stage_run(params, "train-dit", resume_run_id=first) as t:
        assert t.run_id == first
        t.log_metrics({"loss": 1.0}, step=2)
    mlflow.set_tracking_uri(isolated_mlflow)
    history = mlflow.MlflowClient().get_metric_history(first, "loss")
    assert [m.value for m in history] == [2.0, 1.0]


def test_unreachable_server_warns_once_and_keeps_working(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    params = load_params(ROOT / "params.yaml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(params, "prepare")
        assert tracker.start() is None
        tracker.log_metrics({"x": 1.0}, step=1)
        tracker.log_artifact(ROOT / "params.yaml")
        tracker.end()
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "MLflow tracking disabled for stage prepare" in msgs[0]
    assert "metrics stay in the local metrics files" in msgs[0]


def test_project_root_of_a_dvc_temp_experiment_is_the_main_tree(tmp_path, monkeypatch):
    from aligntok.tracking import project_root
    exp = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    exp.mkdir(parents=True)
    monkeypatch.chdir(exp)
    assert project_root() == tmp_path / "proj"


def test_compare_shows_differing_params_and_skips_interrupted_pipelines(isolated_mlflow):
    import os

    from aligntok.stages.compare import compare_table, render
    from aligntok.tracking import create_parent_run, log_final_metrics_to_parent, search_runs
    a = load_params(ROOT / "params.yaml", ["tokenizer.stage2.semantic_weight=0"])
    b = load_params(ROOT / "params.yaml")
    for params, gfid in ((a, 12.5), (b, 10.0), (b, None)):
        os.environ["ALIGNTOK_PARENT_RUN_ID"] = create_parent_run(params)
        if gfid is not None:
            log_final_metrics_to_parent(params, {"gfid": gfid, "psnr": 20.0})
    del os.environ["ALIGNTOK_PARENT_RUN_ID"]
    header, rows = compare_table(search_runs(b))
    assert header == ["run", "tokenizer.stage2.semantic_weight", "psnr", "gfid"]
    assert [r[1:] for r in rows] == [["0.0", "20", "12.5"], ["1.0", "20", "10"]]
    assert render(header, rows, "csv").splitlines()[0] == "run,tokenizer.stage2.semantic_weight,psnr,gfid"
