"""The end of a pipeline's parent run: what it produced, whether its stages ran or came from DVC's cache.

DVC restores a stage whose deps and params it has seen before instead of running it, so such a stage logs no
MLflow run. When the pipeline ends, its parent run gets the final metrics (outputs/metrics/*.json, which DVC
restores too) and, per restored stage, a child run tagged `restored=true` with the metrics of its metrics file and
the id of the run that produced those outs (`restored_from_run_id`). Stages are matched by the hash of their outs
in dvc.lock (tag `outs_hash`, set on every stage run of a finished pipeline): equal outs, the same results.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path

import yaml

from aligntok.config import Params
from aligntok.tracking.keys import final_metric_keys
from aligntok.tracking.pipeline import end_parent_run
from aligntok.tracking.uri import redact, tracking_uri

FINAL_STAGE = "evaluate"  # its metrics are the pipeline's headline numbers, logged unprefixed


def outs_hashes(workdir: Path) -> dict[str, str]:
    """{stage: hash of its outs (paths and content hashes) in dvc.lock}."""
    lock = workdir / "dvc.lock"
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.is_file() else {}
    return {name: hashlib.sha256(json.dumps(sorted((o["path"], o.get("md5") or o.get("hash", ""))
                                                   for o in entry.get("outs", []))).encode()).hexdigest()[:16]
            for name, entry in stages.items() if entry.get("outs")}


def stage_numbers(workdir: Path, stage: str) -> dict[str, float]:
    """The top-level numbers of a stage's metrics file (what the stage logged as its final metrics)."""
    path = workdir / "outputs" / "metrics" / f"{stage}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def finish_pipeline(params: Params, parent: str | None, status: str, workdir: Path = Path("."),
                    stages: list[str] | None = None) -> None:
    """Record what the pipeline in `workdir` produced on its parent run, then give the run its final status.
    `stages`: the ones this pipeline reproduced (default: every stage of dvc.lock; a committed dvc.lock may list
    stages a failed pipeline never reached). Never raises: a tracking outage leaves the local outputs as the record."""
    if not parent:
        return
    try:
        import mlflow
        client = mlflow.MlflowClient(tracking_uri(params))
        _record(client, parent, status, workdir, stages)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"MLflow: could not record the pipeline's outputs on run {parent} ({type(e).__name__}: {e})",
                      RuntimeWarning)
    end_parent_run(params, parent, status)


def _record(client, parent: str, status: str, workdir: Path, stages: list[str] | None) -> None:
    from mlflow.entities import Metric
    run = client.get_run(parent)
    exp = run.info.experiment_id
    hashes = {s: h for s, h in outs_hashes(workdir).items() if stages is None or s in stages}
    ran = {}
    for child in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'"):
        if child.info.status == "FINISHED" and child.data.tags.get("stage") in hashes:
            ran[child.data.tags["stage"]] = child.info.run_id
            client.set_tag(child.info.run_id, "outs_hash", hashes[child.data.tags["stage"]])
    for stage in hashes.keys() - ran.keys():
        _restored_child(client, exp, run, stage, hashes[stage], final_metric_keys(stage, stage_numbers(workdir, stage)))
    if status == "FINISHED":  # a failed pipeline's workdir may hold older metrics files (git-tracked)
        now = int(time.time() * 1000)
        final = {(k if stage == FINAL_STAGE else f"{stage}/{k}"): v
                 for stage in hashes for k, v in stage_numbers(workdir, stage).items()}
        metrics = [Metric(k, v, now, 0) for k, v in final.items()]
        for start in range(0, len(metrics), 500):
            client.log_batch(parent, metrics=metrics[start:start + 500])
    if (workdir / "dvc.lock").is_file():  # the lock the pipeline ended with: every out it used, by hash
        client.log_text(parent, redact((workdir / "dvc.lock").read_text()), "config/dvc.lock")


def _restored_child(client, exp: str, parent, stage: str, outs_hash: str, numbers: dict[str, float]) -> None:
    """A child run for a stage DVC restored, pointing at the run that produced its outs."""
    origin = next((r for r in client.search_runs([exp], f"tags.stage = '{stage}' and tags.outs_hash = '{outs_hash}'",
                                                 order_by=["attributes.start_time DESC"])
                   if r.data.tags.get("restored") != "true" and r.info.status == "FINISHED"), None)
    keep = {k: v for k, v in parent.data.tags.items() if k in ("pipeline_id", "profile", "git_commit",
                                                                "dvc_exp_name", "mlflow.source.git.commit")}
    if origin is None:
        note = "Restored by DVC from its cache; the run that produced these outputs is not in this tracking store."
    else:
        url = f"#/experiments/{exp}/runs/{origin.info.run_id}?workflowType=machine_learning"
        note = f"Restored by DVC from its cache: outputs of run [{origin.info.run_id}]({url})."
    child = client.create_run(exp, run_name=stage, tags={
        **keep, "mlflow.parentRunId": parent.info.run_id, "stage": stage, "restored": "true",
        "outs_hash": outs_hash, "restored_from_run_id": origin.info.run_id if origin else "",
        "restored_from_pipeline": origin.data.tags.get("mlflow.parentRunId", "") if origin else "",
        "mlflow.note.content": note})
    for k, v in numbers.items():
        client.log_metric(child.info.run_id, k, v)
    client.set_terminated(child.info.run_id, "FINISHED")
