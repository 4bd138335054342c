"""The path a Prefect UI user takes: a real `prefect server start` on 127.0.0.1, the deployment served the way the
README serves it (`python -m pipelines.serve`), and flow runs created over the server's HTTP API exactly as the
UI's Run button creates them (POST /deployments/{id}/create_flow_run). Nothing here calls the flow function.
"""
import subprocess
import sys
import urllib.error

import pytest

from tests.conftest import ROOT
from tests.prefect_harness import _api, _result, _run_and_wait, _stop_group, _task_states, served  # noqa: F401
from tests.test_pipeline import STAGES, sh

pytestmark = pytest.mark.slow


def test_parameter_form_has_types_descriptions_and_choices(served):
    schema = served["deployment"]["parameter_openapi_schema"]
    defs = schema.get("definitions") or schema.get("$defs")
    form = defs["PipelineParams"]["properties"]
    assert {"profile", "task", "semantic_weight", "dit_steps", "cfg_scale", "tokenizer_kind", "overrides"} <= set(form)
    for name, field in form.items():
        assert field.get("description"), f"{name} has no description in the run form"
    assert form["profile"]["enum"] == sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml")) or \
        sorted(form["profile"]["enum"]) == sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml"))
    assert form["tokenizer_kind"]["enum"] == ["aligntok", "vae", "external"] and form["task"]["enum"] == ["class", "text"]
    assert not any("anyOf" in field for field in form.values())  # no "Property is type None" alternative
    assert served["deployment"]["parameters"]["params"] == {"profile": "ci", "overrides": []}  # `--profile ci`


def test_bad_parameter_is_refused_with_a_readable_message(served):
    dep = served["deployment"]
    with pytest.raises(urllib.error.HTTPError) as err:
        _api(served["api"], f"/deployments/{dep['id']}/create_flow_run",
             {"parameters": {"params": {"profile": "ci", "dit_steps": -1}}})
    body = err.value.read().decode()
    assert err.value.code in (409, 422) and "dit_steps" in body, body


def test_default_then_custom_run_complete_every_stage(served):
    default = _run_and_wait(served, {})
    assert default["state"]["type"] == "COMPLETED", served["log"].read_text()[-4000:]
    assert default["name"] == "ci"  # named after the form's values
    states = _task_states(served, default["id"])
    assert states == {s: "COMPLETED" for s in STAGES}
    result = _result(served, default["id"])
    assert result["stages"] == STAGES
    assert result["metrics"]["protocol"]["cfg_scale"] == 4.0 and result["metrics"]["gfid"] > 0

    custom = _run_and_wait(served, {"params": {"profile": "ci", "cfg_scale": 2.0}})
    assert custom["state"]["type"] == "COMPLETED", served["log"].read_text()[-4000:]
    assert custom["name"] == "ci-cfg_scale=2.0"
    assert _task_states(served, custom["id"]) == {s: "COMPLETED" for s in STAGES}
    metrics = _result(served, custom["id"])["metrics"]
    assert metrics["protocol"]["cfg_scale"] == 2.0
    # only evaluate reads eval.cfg_scale: every other stage of the second worktree comes from DVC's run-cache
    logs, page = [], None
    while page is None or len(page) == 200:  # the API returns at most 200 records per call
        page = _api(served["api"], "/logs/filter", {"logs": {"flow_run_id": {"any_": [custom["id"]]}},
                                                    "sort": "TIMESTAMP_ASC", "limit": 200, "offset": len(logs)})
        logs += page
    text = "\n".join(entry["message"] for entry in logs)
    assert all(f"Stage '{s}' is cached" in text for s in STAGES[:-1]), text[-3000:]
    assert "Running stage 'evaluate'" in text and "Stage 'evaluate' is cached" not in text
    # a UI-triggered run works in its own worktree: the served repo's own outputs were never written
    assert not (served["repo"] / "outputs").exists()
    artifacts = _api(served["api"], "/artifacts/filter", {"flow_runs": {"id": {"any_": [custom["id"]]}}})
    table = next(a for a in artifacts if a["key"] == "final-metrics")
    assert "| gfid_cfg |" in table["data"]


# The ci profile as a text-to-image run, chosen in the form: captioned scenes, the offline text encoder, the text DiT
TEXT_FORM = {"profile": "ci", "task": "text",
             "overrides": ["data.source=scenes", "data.name=scenes", "data.num_classes=4", "latents.hflip=false",
                           "dit.qk_norm=true"]}


def test_a_text_to_image_run_from_the_form_completes_every_stage(served):
    run = _run_and_wait(served, {"params": TEXT_FORM})
    assert run["state"]["type"] == "COMPLETED", served["log"].read_text()[-4000:]
    assert _task_states(served, run["id"]) == {s: "COMPLETED" for s in STAGES}
    metrics = _result(served, run["id"])["metrics"]
    protocol = metrics["protocol"]  # the numbers of the protocol block (its strings are in outputs/protocol/)
    assert 0 < protocol["num_prompts"] <= protocol["num_samples"] and "clip_score" not in metrics
    for key in ("caption_acc_judge", "caption_acc_judge_cfg", "attr_acc_position_judge_cfg", "gfid_cfg"):
        assert 0 <= metrics[key] < float("inf"), key
    assert metrics["caption_acc_chance"] == pytest.approx(1 / 384, rel=1e-9)


def test_work_pool_deployment_runs_on_a_process_worker(served):
    """`python -m pipelines.deploy` puts the flow on a work pool; a `prefect worker` (on a GPU node, in real use)
    picks up a run created through the API and executes every stage; the serving process is not involved."""
    repo, env = served["repo"], served["env"]
    sh([sys.executable, "-m", "pipelines.deploy", "--pool", "gpu-test", "--name", "on-pool", "--profile", "ci"],
       repo, env)
    log = open(served["log"].with_name("worker.log"), "w")
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu-test"], cwd=repo,
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        dep = _api(served["api"], "/deployments/name/aligntok-pipeline/on-pool")
        assert dep["work_pool_name"] == "gpu-test"
        run = _run_and_wait({**served, "deployment": dep, "log": served["log"].with_name("worker.log")}, {})
        assert run["state"]["type"] == "COMPLETED", served["log"].with_name("worker.log").read_text()[-4000:]
        assert _task_states(served, run["id"]) == {s: "COMPLETED" for s in STAGES}
        assert run["work_queue_name"] and run["infrastructure_pid"]  # started by the worker, not by the server
    finally:
        _stop_group(worker)
        log.close()
