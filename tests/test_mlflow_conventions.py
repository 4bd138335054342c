"""MLflow and Prefect conventions a user of those tools expects, through the CLI in a repo copy."""
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from pipelines.flow import StageFailed, run_streaming, transient
from tests.test_pipeline import copy_repo, isolated_env, sh


@pytest.fixture
def ci_repo(tmp_path):
    env = dict(isolated_env(tmp_path), MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    repo = copy_repo(tmp_path / "aligntok")
    sh([sys.executable, "-m", "aligntok.cli", "profile", "ci"], repo, env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tokenizer"]["stage1"].update(steps=4, ckpt_every=2, log_every=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo, env


def _runs(env):
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("aligntok")
    return client, client.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_pipeline_parent_status_sources_and_dataset_input(ci_repo):
    repo, env = ci_repo
    sh([sys.executable, "-m", "aligntok.cli", "repro", "tokenizer-stage1"], repo, env)
    client, runs = _runs(env)
    parent = next(r for r in runs if r.data.tags.get("role") == "pipeline")
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"prepare", "tokenizer-stage1"}
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("ci-")
    head = sh(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    stage1 = client.get_run(children["tokenizer-stage1"].info.run_id)
    assert stage1.data.tags["mlflow.source.git.commit"] == head == parent.data.tags["mlflow.source.git.commit"]
    assert {a.path for a in client.list_artifacts(stage1.info.run_id, "config")} >= {"config/params.yaml"}
    manifest = yaml.safe_load((repo / "data/synthetic/manifest.json").read_text())
    inputs = stage1.inputs.dataset_inputs
    assert [i.dataset.digest for i in inputs] == [manifest["content_hash"][:16]]
    assert any(k.startswith("system/") for k in stage1.data.metrics), sorted(stage1.data.metrics)


@pytest.mark.slow
def test_sigterm_ends_the_stage_run_as_killed(ci_repo):
    repo, env = ci_repo
    sh([sys.executable, "-m", "aligntok.cli", "prepare"], repo, env)
    proc = subprocess.Popen([sys.executable, "-m", "aligntok.cli", "tokenizer-stage1", "-S",
                             "tokenizer.stage1.steps=100000"], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (repo / "checkpoints/tokenizer-stage1/latest").exists():  # training has started
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # what a Prefect cancel or a Slurm preemption sends
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    _, runs = _runs(env)
    stage = next(r for r in runs if r.data.tags.get("stage") == "tokenizer-stage1")
    assert stage.info.status == "KILLED"


def test_stage_failures_are_retried_only_when_a_rerun_can_help(tmp_path):
    from prefect.states import Failed

    def fail_with(code: int) -> StageFailed:
        script = f"echo \"ERROR: failed to run: aligntok x, exited with {code}\"; exit 255"
        with pytest.raises(StageFailed) as err:
            run_streaming(["sh", "-c", script], tmp_path, dict(os.environ), 60, lambda line: None)
        return err.value

    assert fail_with(2).code == 2  # dvc's own 255 is not what decides
    for code, retry in [(2, False), (3, False), (1, True), (-9, True)]:
        assert transient(None, None, Failed(data=fail_with(code))) is retry, code


def test_a_killed_stage_is_not_reported_as_a_timeout(tmp_path):
    """A stage killed from outside (preemption, the OOM killer) is named so; only the flow's own timer is a timeout."""
    killed = "kill -9 $$"  # the stage's group leader dies of SIGKILL, as under the OOM killer
    with pytest.raises(StageFailed) as err:
        run_streaming(["sh", "-c", killed], tmp_path, dict(os.environ), 60, lambda line: None)
    assert str(err.value).endswith("exited with -9 (killed by signal 9)") and err.value.code == -9
    with pytest.raises(StageFailed) as err:
        run_streaming(["sh", "-c", "exec sleep 60"], tmp_path, dict(os.environ), 1, lambda line: None)
    assert "(killed: timeout after 1 s)" in str(err.value)
