"""The pipeline's parent run: created once per pipeline execution, RUNNING until the pipeline ends."""
from __future__ import annotations

import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from aligntok.config import Params
from aligntok.tracking.uri import git_commit, param_strings, redact, source_commit, tracking_uri, use_experiment

PIPELINE_ROLE = "pipeline"


def create_parent_run(params: Params, pid: str | None = None, name: str | None = None,
                      tags: dict[str, str] | None = None, env: dict[str, str] | None = None,
                      workdir: Path = Path(".")) -> str:
    """Create the pipeline's parent run (ended at once; children attach by id) and return its id.

    `name` (a Prefect flow run's name) wins over the DVC experiment's, read from `env` (the stages' environment,
    default this process's); `workdir` holds the pipeline's params.yaml and dvc.lock, logged under config/."""
    import mlflow
    mlflow.set_tracking_uri(tracking_uri(params))
    use_experiment(params.tracking.experiment)
    env = os.environ if env is None else env
    pid = pid or env.get("ALIGNTOK_PIPELINE_ID") or f"pipeline-{uuid.uuid4().hex[:12]}"
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(params.tracking.experiment)
    exp_name = env.get("DVC_EXP_NAME", "")
    name = name or exp_name or f"{params.profile}-{time.strftime('%Y%m%d-%H%M%S')}"
    head = source_commit()
    run = client.create_run(exp.experiment_id, run_name=name,
                            tags={"role": PIPELINE_ROLE, "pipeline_id": pid, "profile": params.profile, "task": params.task,
                                  "git_commit": git_commit(), "dvc_exp_name": exp_name,
                                  **({"mlflow.source.git.commit": head} if head else {}), **(tags or {})})
    from mlflow.entities import Param
    items = [Param(k, v) for k, v in param_strings(params).items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start:start + 100])
    for file in ("params.yaml", "dvc.lock"):
        if (workdir / file).is_file():
            client.log_text(run.info.run_id, redact((workdir / file).read_text()), f"config/{file}")
    return run.info.run_id  # stays RUNNING until the pipeline ends (end_parent_run)

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui --host 127.0.0.1` serves a local store


def ui_command(params: Params) -> str:
    """How to open the MLflow UI on this tracking store (a URL already on a server)."""
    uri = redact(tracking_uri(params))
    return uri if uri.startswith("http") else f"mlflow ui --host 127.0.0.1 --backend-store-uri {uri}"


def run_url(params: Params, run_id: str | None = None) -> str:
    """A run's page (else the experiment's) in the MLflow UI, in its training-runs view: MLflow 3 opens an
    experiment in its GenAI view unless the link says workflowType=machine_learning. A local store's link points
    at `mlflow ui --host 127.0.0.1` (ui_command)."""
    import mlflow
    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = (client.get_run(run_id).info.experiment_id if run_id else
           client.get_experiment_by_name(params.tracking.experiment).experiment_id)
    base = uri.rstrip("/") if uri.startswith("http") else LOCAL_UI
    page = f"experiments/{exp}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/#/{page}?workflowType=machine_learning"

def end_parent_run(params: Params, run_id: str | None, status: str) -> None:
    """Give the pipeline's parent run its real final status (FINISHED, FAILED or KILLED); never raises."""
    if not run_id:
        return
    try:
        import mlflow
        mlflow.set_tracking_uri(tracking_uri(params))
        mlflow.MlflowClient().set_terminated(run_id, status)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"MLflow: could not end the parent run {run_id} ({type(e).__name__})", RuntimeWarning)

def log_final_metrics_to_parent(params: Params, metrics: dict[str, float]) -> None:
    """Copy the headline metrics onto the parent run so the MLflow table compares pipelines directly."""
    parent = os.environ.get("ALIGNTOK_PARENT_RUN_ID")
    try:
        import mlflow
        mlflow.set_tracking_uri(tracking_uri(params))
        client = mlflow.MlflowClient()
        if not parent:
            exp = mlflow.get_experiment_by_name(params.tracking.experiment)
            pid = os.environ.get("ALIGNTOK_PIPELINE_ID")
            if exp is None or not pid:
                return
            runs = client.search_runs([exp.experiment_id],
                                      f"tags.pipeline_id = '{pid}' and tags.role = '{PIPELINE_ROLE}'", max_results=1)
            if not runs:
                return
            parent = runs[0].info.run_id
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                client.log_metric(parent, k, float(v))
        if not os.environ.get("ALIGNTOK_PARENT_RUN_ID"):  # plain `dvc repro`: the last stage ends the pipeline
            client.set_terminated(parent, "FINISHED")
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"MLflow: could not copy final metrics to the parent run ({e})", RuntimeWarning)

def search_runs(params: Params, experiment: str | None = None) -> list[Any]:
    """All runs of an experiment as mlflow Run objects (for `aligntok compare`)."""
    import mlflow
    mlflow.set_tracking_uri(tracking_uri(params))
    exp = mlflow.get_experiment_by_name(experiment or params.tracking.experiment)
    if exp is None:
        return []
    return mlflow.MlflowClient().search_runs([exp.experiment_id], max_results=5000)
