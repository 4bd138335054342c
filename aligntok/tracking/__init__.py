"""MLflow tracking: the only module that imports mlflow.

One parent run per pipeline execution, one child run per stage. DVC runs every stage in its own process, so
the parent is found through a pipeline id: `ALIGNTOK_PARENT_RUN_ID` (set by `aligntok repro` and the Prefect
flow) wins; else `ALIGNTOK_PIPELINE_ID`; else the id of the `dvc repro`/`dvc exp run` process this stage runs
under (pid + start time, read from /proc). A tracking outage warns once and never fails the stage: metrics
always also land in the stage's local metrics/plots files. Metric points go through a local journal and a
background sender (`tracking_journal`), so a server outage mid-run neither stalls training nor loses points.
"""
from aligntok.tracking.finish import finish_pipeline
from aligntok.tracking.journal import MetricJournal, sync_journals
from aligntok.tracking.pipeline import (PIPELINE_ROLE, create_parent_run, end_parent_run, log_final_metrics_to_parent,
                                        run_url, search_runs, ui_command)
from aligntok.tracking.run import Tracker, pipeline_id, stage_run
from aligntok.tracking.uri import git_commit, project_root, redact, source_commit, tracking_uri

__all__ = ["MetricJournal", "PIPELINE_ROLE", "Tracker", "create_parent_run", "end_parent_run", "finish_pipeline",
           "git_commit", "log_final_metrics_to_parent", "pipeline_id", "project_root", "redact", "run_url",
           "search_runs", "source_commit", "stage_run", "sync_journals", "tracking_uri", "ui_command"]
