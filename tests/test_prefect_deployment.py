"""The path a Prefect UI user takes: a real `prefect server start` on 127.0.0.1, the deployment served the way the
README serves it (`python -m pipelines.serve`), and flow runs created over the server's HTTP API exactly as the
UI's Run button creates them (POST /deployments/{id}/create_flow_run). Nothing here calls the flow function.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import ROOT
from tests.test_pipeline import STAGES, copy_repo, sh

pytestmark = pytest.mark.slow
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, path: str, body: dict | None = None, method: str | None = None):
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 method=method or ("POST" if body is not None else "GET"),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop a server we started, through its own process group (never by name)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(api url, repo, env): a Prefect server on a free 127.0.0.1 port and the deployment served from a repo copy."""
    base = tmp_path_factory.mktemp("prefect")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ALIGNTOK_"))}
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env.update(PREFECT_HOME=str(base / "home"), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MLFLOW_TRACKING_URI=f"sqlite:///{base / 'mlflow.db'}", TQDM_DISABLE="1")
    repo = copy_repo(base / "aligntok")
    logs = {name: open(base / f"{name}.log", "w") for name in ("server", "serve")}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], cwd=base, env=env, stdout=logs["server"],
                              stderr=subprocess.STDOUT, start_new_session=True)
    serve = None
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                _api(api, "/health")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("prefect server did not start:\n" + (base / "server.log").read_text()[-3000:])
                time.sleep(1)
        serve = subprocess.Popen([sys.executable, "-m", "pipelines.serve", "--profile", "ci"], cwd=repo, env=env,
                                 stdout=logs["serve"], stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                dep = _api(api, "/deployments/name/aligntok-pipeline/aligntok")
                break
            except urllib.error.HTTPError:
                if serve.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("deployment not served:\n" + (base / "serve.log").read_text()[-3000:])
                time.sleep(1)
        yield {"api": api, "repo": repo, "env": env, "deployment": dep, "log": base / "serve.log"}
    finally:
        for proc in (serve, server):
            if proc is not None:
                _stop_group(proc)
        for f in logs.values():
            f.close()


def _run_and_wait(served, parameters: dict, timeout_s: float = 1500) -> dict:
    dep = served["deployment"]
    run = _api(served["api"], f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters})
    deadline = time.monotonic() + timeout_s
    while True:
        run = _api(served["api"], f"/flow_runs/{run['id']}")
        if run["state"]["type"] in TERMINAL:
            return run
        assert time.monotonic() < deadline, f"flow run still {run['state']['type']}:\n" + served["log"].read_text()[-4000:]
        time.sleep(3)


def _task_states(served, flow_run_id: str) -> dict[str, str]:
    trs = _api(served["api"], "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    by_length = sorted(STAGES, key=len, reverse=True)  # task runs are named "<stage>-<short id>"
    return {next(s for s in by_length if t["name"].startswith(s + "-")): t["state"]["type"] for t in trs}


def _result(served, flow_run_id: str) -> dict:
    """The flow run's return value, loaded from its persisted result the way a Prefect client does."""
    script = ("import asyncio, json, sys, uuid\n"
              "from prefect.client.orchestration import get_client\n"
              "async def main():\n"
              "    async with get_client() as c:\n"
              "        run = await c.read_flow_run(uuid.UUID(sys.argv[1]))\n"
              "    return await run.state.aresult()\n"
              "print('RESULT', json.dumps(asyncio.run(main()), default=str))\n")
    out = sh([sys.executable, "-c", script, flow_run_id], served["repo"], served["env"]).stdout
    return json.loads(out.split("RESULT", 1)[1])


def test_parameter_form_has_types_descriptions_and_choices(served):
    schema = served["deployment"]["parameter_openapi_schema"]
    defs = schema.get("definitions") or schema.get("$defs")
    form = defs["PipelineParams"]["properties"]
    assert {"profile", "semantic_weight", "dit_steps", "cfg_scale", "tokenizer_kind", "overrides"} <= set(form)
    for name, field in form.items():
        assert field.get("description"), f"{name} has no description in the run form"
    assert form["profile"]["enum"] == sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml")) or \
        sorted(form["profile"]["enum"]) == sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml"))
    kinds = [a for a in form["tokenizer_kind"]["anyOf"] if "enum" in a]
    assert kinds and kinds[0]["enum"] == ["aligntok", "vae"]
    assert served["deployment"]["parameters"]["params"]["profile"] == "ci"  # `--profile ci` set the form default


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
