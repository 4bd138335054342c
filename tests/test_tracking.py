"""MLflow tracking against a real sqlite store: parent/child runs across processes, outage tolerance."""
import re
import subprocess
import sys
import textwrap
import warnings

import mlflow

from aligntok.config import load_params
from aligntok.tracking import Tracker, git_commit, stage_run
from tests.conftest import ROOT, SMOKE

STAGE_SCRIPT = textwrap.dedent("""
    import sys
    from aligntok.config import load_params
    from aligntok.tracking import stage_run
    params = load_params(sys.argv[1])
    with stage_run(params, sys.argv[2]) as t:
        t.log_metrics({"loss": 1.5}, step=1)
        t.log_metrics({"loss": 0.5}, step=2)
""")


def git(*args, cwd=ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_two_stage_processes_share_one_parent(tmp_path, isolated_mlflow, monkeypatch):
    monkeypatch.setenv("ALIGNTOK_PIPELINE_ID", "pipe-123")
    in_git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode == 0
    heads = {git("rev-parse", "HEAD")} if in_git else set()
    if in_git:  # the stages see this checkout's git state while working in tmp_path (isolated_mlflow's cwd), so
        # what they write relative to the working directory (./mlruns, ./checkpoints/tracking) is not in the checkout
        monkeypatch.setenv("GIT_DIR", git("rev-parse", "--absolute-git-dir"))
        monkeypatch.setenv("GIT_WORK_TREE", str(ROOT))
    for stage in ("prepare", "tokenizer-stage1"):
        subprocess.run([sys.executable, "-c", STAGE_SCRIPT, str(SMOKE), stage], check=True, cwd=tmp_path)
    if in_git:
        heads.add(git("rev-parse", "HEAD"))  # the work tree may be committed to meanwhile
    mlflow.set_tracking_uri(isolated_mlflow)
    runs = mlflow.search_runs(experiment_names=["aligntok"], filter_string="tags.pipeline_id = 'pipe-123'",
                              output_format="list")
    parents = [r for r in runs if r.data.tags.get("role") == "pipeline"]
    children = [r for r in runs if r.data.tags.get("role") != "pipeline"]
    assert len(parents) == 1
    assert sorted(r.data.tags["stage"] for r in children) == ["prepare", "tokenizer-stage1"]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    child = children[0]
    assert child.data.params["tokenizer.stage2.lr"] == str(load_params(SMOKE).tokenizer.stage2.lr)
    assert child.data.tags["profile"] == "smoke"
    # the commit the stage ran from ("-dirty" with uncommitted changes to tracked files; exact in
    # test_git_commit_names_head_and_uncommitted_changes), for the parent and every child
    for r in runs:
        if in_git:
            assert r.data.tags["git_commit"].removesuffix("-dirty") in heads, r.data.tags["git_commit"]
        else:  # an unpacked archive: no commit to name
            assert not re.fullmatch(r"[0-9a-f]{40}(-dirty)?", r.data.tags["git_commit"])
    history = mlflow.MlflowClient().get_metric_history(child.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 0.5)]


def test_git_commit_names_head_and_uncommitted_changes(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no enclosing repository is found
    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(var, raising=False)
    git("init", "-q", cwd=repo)
    (repo / "a.txt").write_text("one")
    git("add", "a.txt", cwd=repo)
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "one", cwd=repo)
    head = git("rev-parse", "HEAD", cwd=repo)
    monkeypatch.chdir(repo)
    assert git_commit() == head
    (repo / "new.txt").write_text("untracked files do not count")
    assert git_commit() == head
    (repo / "a.txt").write_text("two")
    assert git_commit() == head + "-dirty"
    outside = tmp_path / "plain"
    outside.mkdir()
    monkeypatch.chdir(outside)
    # no repository: a placeholder string, never something that looks like a commit id
    value = git_commit()
    assert isinstance(value, str) and not re.fullmatch(r"[0-9a-f]{40}(-dirty)?", value)


def test_resumed_stage_reopens_its_run(isolated_mlflow, monkeypatch):
    monkeypatch.setenv("ALIGNTOK_PIPELINE_ID", "pipe-resume")
    params = load_params(SMOKE)
    with stage_run(params, "train-dit") as t:
        first = t.run_id
        t.log_metrics({"loss": 2.0}, step=1)
    with stage_run(params, "train-dit", resume_run_id=first) as t:
        assert t.run_id == first
        t.log_metrics({"loss": 1.0}, step=2)
    mlflow.set_tracking_uri(isolated_mlflow)
    history = mlflow.MlflowClient().get_metric_history(first, "loss")
    assert [m.value for m in history] == [2.0, 1.0]


def test_unreachable_server_warns_once_and_keeps_working(isolated_mlflow, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    params = load_params(SMOKE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(params, "prepare")
        assert tracker.start() is None
        tracker.log_metrics({"x": 1.0}, step=1)
        tracker.log_artifact(SMOKE)
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


def test_compare_shows_differing_params_and_skips_interrupted_pipelines(isolated_mlflow, monkeypatch):
    from aligntok.stages.compare import compare_table, render
    from aligntok.tracking import create_parent_run, log_final_metrics_to_parent, search_runs
    a = load_params(SMOKE, ["tokenizer.stage2.semantic_weight=0"])
    b = load_params(SMOKE)
    for params, gfid in ((a, 12.5), (b, 10.0), (b, None)):
        monkeypatch.setenv("ALIGNTOK_PARENT_RUN_ID", create_parent_run(params))
        if gfid is not None:
            log_final_metrics_to_parent(params, {"gfid": gfid, "psnr": 20.0})
    monkeypatch.delenv("ALIGNTOK_PARENT_RUN_ID")
    header, rows = compare_table(search_runs(b))
    assert header == ["run", "tokenizer.stage2.semantic_weight", "psnr", "gfid"]
    assert [r[1:] for r in rows] == [["0.0", "20", "12.5"], ["1.0", "20", "10"]]
    assert render(header, rows, "csv").splitlines()[0] == "run,tokenizer.stage2.semantic_weight,psnr,gfid"


def _pipeline(params, work, monkeypatch, outs: dict[str, str], ran: list[str], **parent_args) -> str:
    """One pipeline in `work`: dvc.lock with these outs hashes, a metrics file per stage, a child run for each
    stage that ran (the others DVC restored), then the pipeline's end as the flow and `aligntok repro` end it."""
    import json
    import yaml as pyyaml
    from aligntok.tracking import create_parent_run, finish_pipeline
    lock = {"schema": "2.0", "stages": {s: {"cmd": f"aligntok {s}", "outs": [{"path": f"o/{s}", "hash": "md5",
                                                                              "md5": h}]} for s, h in outs.items()}}
    (work / "dvc.lock").write_text(pyyaml.safe_dump(lock))
    (work / "outputs" / "metrics").mkdir(parents=True, exist_ok=True)
    for stage, h in outs.items():
        (work / "outputs" / "metrics" / f"{stage}.json").write_text(json.dumps({"score": len(h), "nested": {"x": 1}}))
    parent = create_parent_run(params, workdir=work, **parent_args)
    monkeypatch.setenv("ALIGNTOK_PARENT_RUN_ID", parent)
    for stage in ran:
        with stage_run(params, stage) as t:
            t.log_metrics({"score": len(outs[stage])})
    monkeypatch.delenv("ALIGNTOK_PARENT_RUN_ID")
    finish_pipeline(params, parent, "FINISHED", work)
    return parent


def test_a_restored_stage_points_at_the_run_that_produced_it(tmp_path, isolated_mlflow, monkeypatch):
    params = load_params(SMOKE)
    first = _pipeline(params, tmp_path, monkeypatch, {"prepare": "aa", "evaluate": "e1"}, ["prepare", "evaluate"])
    second = _pipeline(params, tmp_path, monkeypatch, {"prepare": "aa", "evaluate": "e222"}, ["evaluate"],
                       name="ci-cfg_scale=2.0", tags={"prefect.flow_run_id": "f2"}, env={"DVC_EXP_NAME": "exp-2"})
    client = mlflow.MlflowClient(isolated_mlflow)
    a, b = client.get_run(first), client.get_run(second)
    assert (b.info.run_name, b.data.tags["dvc_exp_name"], b.data.tags["prefect.flow_run_id"]) == \
        ("ci-cfg_scale=2.0", "exp-2", "f2")
    # the parent holds every stage's final numbers (the last stage's unprefixed), restored or not
    assert a.data.metrics == {"score": 2.0, "prepare/score": 2.0} and b.data.metrics == {"score": 4.0,
                                                                                         "prepare/score": 2.0}
    assert all(r.info.status == "FINISHED" for r in (a, b))
    exp = a.info.experiment_id
    kids = {p: {r.data.tags["stage"]: r for r in client.search_runs([exp], f"tags.mlflow.parentRunId = '{p}'")}
            for p in (first, second)}
    assert set(kids[second]) == {"prepare", "evaluate"}
    restored = kids[second]["prepare"]
    assert restored.data.tags["restored"] == "true" and restored.data.metrics == {"score": 2.0}
    assert restored.data.tags["restored_from_run_id"] == kids[first]["prepare"].info.run_id
    assert restored.data.tags["restored_from_pipeline"] == first
    assert "restored" not in kids[second]["evaluate"].data.tags
    assert {a.path for a in client.list_artifacts(second, "config")} == {"config/dvc.lock"}
