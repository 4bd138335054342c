"""The ablation path a user takes: runs started from the Prefect form (over the API, as the UI's Run button does),
then compared in MLflow. The second run changes only eval.cfg_scale, so DVC restores every stage but evaluate
from its cache; both parent runs must still carry the final metrics, name the Prefect run and lead to the runs
that produced each restored stage."""
import math
import time
import urllib.error

import pytest

from tests.prefect_harness import TERMINAL, _api, _run_and_wait, _task_states, served  # noqa: F401
from tests.test_pipeline import STAGES

pytestmark = pytest.mark.slow


def _mlflow(served):
    import mlflow
    client = mlflow.MlflowClient(served["env"]["MLFLOW_TRACKING_URI"])
    return client, client.get_experiment_by_name("aligntok").experiment_id


def _create(served, params: dict) -> dict:
    return _api(served["api"], f"/deployments/{served['deployment']['id']}/create_flow_run",
                {"parameters": {"params": params}})


def test_a_bad_override_is_refused_when_the_run_is_created(served):
    with pytest.raises(urllib.error.HTTPError) as err:
        _create(served, {"profile": "ci", "overrides": ["dit.steps=-1"]})
    body = err.value.read().decode()
    assert err.value.code == 409 and "dit.steps=-1" in body, body
    with pytest.raises(urllib.error.HTTPError) as err:
        _create(served, {"profile": "ci", "overrides": ["dit.stepz=3"]})
    assert err.value.code == 409
    assert not _api(served["api"], "/flow_runs/filter", {})  # nothing was created


def test_a_stage_config_error_is_one_line_and_the_run_keeps_its_profile(served):
    """A run on the smoke profile from a deployment served with --profile ci, whose first stage stops at a path
    that does not exist (valid in the form, checked when the stage starts)."""
    run = _run_and_wait(served, {"params": {"profile": "smoke", "overrides": [
        "data.source=imagefolder", "data.root=/no/such/folder"]}})
    assert run["state"]["type"] == "FAILED"
    message = run["state"]["message"]
    assert "data.root" in message and "\n" not in message and "Traceback" not in message, message
    assert "smoke" in run["tags"] and "ci" not in run["tags"], run["tags"]
    assert run["name"] == "smoke-data.source=imagefolder-data.root=/no/such/folder"  # named after its overrides
    client, exp = _mlflow(served)
    parent, = client.search_runs([exp], f"tags.`prefect.flow_run_id` = '{run['id']}'")
    assert parent.data.tags["profile"] == "smoke" and parent.info.status == "FAILED"
    left = [p.name for p in (served["repo"] / "runs").iterdir() if (p / ".git").exists()]
    assert not left, f"worktrees left in runs/: {left}"
    typed = _run_and_wait(served, {"params": {"profile": "smoke", "overrides": ["data.source=imagefolder",
                                                                              "data.root=/no/such/folder"]}},
                          name="my-ablation")
    assert typed["name"] == "my-ablation" and typed["state"]["type"] == "FAILED"  # a name typed in the form stays


def test_a_cached_ablation_compares_side_by_side_in_mlflow(served):
    first = _run_and_wait(served, {"params": {"profile": "ci"}})
    second = _run_and_wait(served, {"params": {"profile": "ci", "cfg_scale": 2.0}})
    for run in (first, second):
        assert run["state"]["type"] == "COMPLETED", served["log"].read_text()[-4000:]
    client, exp = _mlflow(served)
    parents = {r.data.tags.get("prefect.flow_run_id"): r for r in client.search_runs([exp], "tags.role = 'pipeline'")}
    for run in (first, second):
        parent = parents[run["id"]]
        assert parent.info.run_name == run["name"] and parent.data.tags["prefect.flow_run_name"] == run["name"]
        assert parent.data.tags["prefect.flow_run_url"] == f"{served['api'][:-4]}/runs/flow-run/{run['id']}"
        assert parent.data.tags["dvc_exp_name"] and parent.data.tags["profile"] == "ci"
        assert parent.info.status == "FINISHED"
        metrics = parent.data.metrics
        assert {"gfid", "gfid_cfg"} <= set(metrics) and all(math.isfinite(v) for v in metrics.values()), metrics
    a, b = parents[first["id"]], parents[second["id"]]
    assert set(a.data.metrics) == set(b.data.metrics)  # every column of Compare is filled for both
    assert (a.data.params["eval.cfg_scale"], b.data.params["eval.cfg_scale"]) == ("4.0", "2.0")

    def children(parent):
        return {r.data.tags["stage"]: r for r in client.search_runs(
            [exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'") if r.info.status == "FINISHED"}
    ran, reused = children(a), children(b)
    assert set(ran) == set(reused) == set(STAGES)
    assert not any(r.data.tags.get("restored") for r in ran.values())
    assert reused["evaluate"].data.tags.get("restored") is None  # the one stage cfg_scale changes ran again
    for stage in STAGES[:-1]:  # the others came from DVC's cache: each points at the run that produced it
        tags = reused[stage].data.tags
        assert tags["restored"] == "true" and tags["restored_from_run_id"] == ran[stage].info.run_id, (stage, tags)
        assert tags["restored_from_pipeline"] == a.info.run_id
        assert reused[stage].data.metrics and set(reused[stage].data.metrics) <= set(ran[stage].data.metrics)


def test_cancel_ends_the_run_cancelled_without_a_crash(served):
    """The UI's Cancel (state CANCELLING) during a stage after the first: the run ends Cancelled, with no crash in
    its log, and its MLflow parent KILLED."""
    dep = served["deployment"]
    run = _api(served["api"], f"/deployments/{dep['id']}/create_flow_run",
               {"parameters": {"params": {"profile": "ci", "dit_steps": 100000}}})
    deadline = time.monotonic() + 900
    while not {s for s, state in _task_states(served, run["id"]).items() if state == "RUNNING"} - {"prepare"}:
        assert time.monotonic() < deadline, served["log"].read_text()[-3000:]
        time.sleep(2)
    _api(served["api"], f"/flow_runs/{run['id']}/set_state", {"state": {"type": "CANCELLING"}})
    while (run := _api(served["api"], f"/flow_runs/{run['id']}"))["state"]["type"] not in TERMINAL:
        assert time.monotonic() < deadline, served["log"].read_text()[-3000:]
        time.sleep(2)
    logs = _api(served["api"], "/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200,
                                                "sort": "TIMESTAMP_DESC"})
    text = "\n".join(entry["message"] for entry in logs)
    assert run["state"]["type"] == "CANCELLED", (run["state"]["type"], run["state"]["message"],
                                                 served["log"].read_text()[-3000:])
    assert "Crash detected" not in text and "Finished in state Running" not in text, text[-3000:]
    client, exp = _mlflow(served)
    parent, = client.search_runs([exp], f"tags.`prefect.flow_run_id` = '{run['id']}'")
    assert parent.info.status == "KILLED"
