"""A served Prefect deployment for the tests that take a UI user's path: a real `prefect server start` on a free
127.0.0.1 port and `python -m pipelines.serve` from a repo copy, each in its own process group and stopped through
it; flow runs are created over the server's HTTP API exactly as the UI's Run button creates them
(POST /deployments/{id}/create_flow_run). A test module uses it with `from tests.prefect_harness import served`.
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

from tests.test_pipeline import STAGES, copy_repo, sh

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RETRY_CODES = (429, 502, 503)  # what Prefect's own client retries: the server's database was busy, nothing was done


def _api(url: str, path: str, body: dict | None = None, method: str | None = None, attempts: int = 5):
    for attempt in range(attempts):
        req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                     method=method or ("POST" if body is not None else "GET"),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:  # a 503 under load (the UI's client would retry it too)
            if e.code not in RETRY_CODES or attempt == attempts - 1:
                raise
            time.sleep(2 ** attempt)


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


def _run_and_wait(served, parameters: dict, timeout_s: float = 1500, **fields) -> dict:
    """Create a flow run (with `fields` such as the name typed in the form) and wait until it ends."""
    dep = served["deployment"]
    run = _api(served["api"], f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters, **fields})
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
