"""A stage's MLflow child run (`stage_run`), found under its pipeline's parent run.

DVC runs every stage in its own process, so the parent is found through a pipeline id: `ALIGNTOK_PARENT_RUN_ID`
(set by `aligntok repro` and the Prefect flow) wins; else `ALIGNTOK_PIPELINE_ID`; else the id of the
`dvc repro`/`dvc exp run` process this stage runs under (pid + start time, read from /proc).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
import warnings
from pathlib import Path
from typing import Iterator

from aligntok.config import Params
from aligntok.tracking.journal import send_metrics
from aligntok.tracking.pipeline import PIPELINE_ROLE, create_parent_run, end_parent_run
from aligntok.tracking.uri import (_check_http, bound_http_retries, git_commit, param_strings, redact, source_commit,
                                   tracking_uri, use_experiment)


def _dvc_process_id() -> str | None:
    """pid+start time of the nearest `dvc repro`/`dvc exp` ancestor process (Linux /proc), else None."""
    pid = os.getppid()
    for _ in range(8):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        words = [Path(w.decode(errors="replace")).name for w in cmd if w]
        if any(w == "dvc" or w.startswith("dvc") for w in words[:3]) and ("repro" in words or "exp" in words):
            return f"dvc-{pid}-{stat[19]}"  # field 22 of /proc/pid/stat: start time
        pid = int(stat[1])
        if pid <= 1:
            return None
    return None

def pipeline_id() -> str:
    return os.environ.get("ALIGNTOK_PIPELINE_ID") or _dvc_process_id() or f"single-{uuid.uuid4().hex[:12]}"

class Tracker:
    """A stage's MLflow child run. Every call is safe: after the first failure it only warns once."""

    def __init__(self, params: Params, stage: str):
        self.params, self.stage = params, stage
        self.run_id: str | None = None
        # only rank 0 tracks: one child run per stage, not one per GPU, and no race to create the parent
        self.enabled = os.environ.get("ALIGNTOK_TRACKING", "1") != "0" and os.environ.get("RANK", "0") == "0"
        self._mlflow = None
        self.journal = None

    def _fail(self, what: str, err: BaseException) -> None:
        if self.enabled:
            warnings.warn(f"MLflow tracking disabled for stage {self.stage}: {what} failed "
                          f"({type(err).__name__}: {redact(str(err).splitlines()[0]) if str(err) else ''}); "
                          "metrics stay in the local metrics files", RuntimeWarning, stacklevel=3)
        self.enabled = False

    def _call(self, what: str, fn, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - an outage must never fail the stage
            self._fail(what, e)
            return None

    def start(self, resume_run_id: str | None = None) -> str | None:
        if not self.enabled:
            return None
        try:
            import mlflow
            uri = tracking_uri(self.params)
            if uri.startswith("http"):
                bound_http_retries()
                _check_http(uri)
            mlflow.set_tracking_uri(uri)
            use_experiment(self.params.tracking.experiment)
            self._mlflow = mlflow
            if resume_run_id:
                run = mlflow.start_run(run_id=resume_run_id)
            else:
                parent = self._parent_run_id()
                # the monitor's start/stop/no-GPU lines say nothing a stage's log reader needs
                logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
                run = mlflow.start_run(run_name=self.stage, parent_run_id=parent, log_system_metrics=True)
                mlflow.log_params(param_strings(self.params))
                self._log_sources()
            mlflow.set_tags(self._tags())
            self.run_id = run.info.run_id
            from aligntok.tracking.journal import MetricJournal
            self.journal = MetricJournal(self.run_id, send_metrics)
        except Exception as e:  # noqa: BLE001
            self._fail("start", e)
        return self.run_id

    def _log_sources(self) -> None:
        """What the run was made from: params.yaml and dvc.lock as artifacts, the prepared data set as an input."""
        for name in ("params.yaml", "dvc.lock"):
            if Path(name).is_file():
                self._mlflow.log_text(redact(Path(name).read_text()), f"config/{name}")
        manifest = Path("data") / self.params.data.name / "manifest.json"
        if self.stage != "prepare" and manifest.is_file():
            import json
            from mlflow.data.dataset_source_registry import resolve_dataset_source
            from mlflow.data.meta_dataset import MetaDataset
            digest = json.loads(manifest.read_text()).get("content_hash", "")[:16]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # mlflow notes that a local path resolves two equal ways
                source = resolve_dataset_source(str(manifest.parent.resolve()))
            self._mlflow.log_input(MetaDataset(source, name=self.params.data.name, digest=digest), context="train")

    def _tags(self) -> dict[str, str]:
        import torch
        head = source_commit()
        return {**({"mlflow.source.git.commit": head} if head else {}), "mlflow.source.name": f"aligntok {self.stage}",
                "stage": self.stage, "profile": self.params.profile, "task": self.params.task, "git_commit": git_commit(),
                "pipeline_id": os.environ.get("ALIGNTOK_PIPELINE_ID", ""), "hostname": socket.gethostname(),
                "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""), "torch_version": torch.__version__,
                "world_size": os.environ.get("WORLD_SIZE", "1")}

    def _parent_run_id(self) -> str:
        mlflow = self._mlflow
        parent = os.environ.get("ALIGNTOK_PARENT_RUN_ID")
        if parent:
            return parent
        pid = pipeline_id()
        os.environ["ALIGNTOK_PIPELINE_ID"] = pid
        found = mlflow.search_runs(filter_string=f"tags.pipeline_id = '{pid}' and tags.role = '{PIPELINE_ROLE}'",
                                   max_results=1, output_format="list")
        parent = found[0].info.run_id if found else create_parent_run(self.params, pid)
        os.environ["ALIGNTOK_PARENT_RUN_ID_FOUND"] = parent
        return parent

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.journal is not None:
            self.journal.append(clean, step)  # local and immediate; sent in the background
        elif self._mlflow is not None:
            self._call("log_metrics", self._mlflow.log_metrics, clean, step=step)

    def log_image(self, image, key: str, step: int) -> None:
        if self._mlflow is not None:
            self._call("log_image", self._mlflow.log_image, image, key=key, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._mlflow is not None and Path(path).exists():
            fn = self._mlflow.log_artifacts if Path(path).is_dir() else self._mlflow.log_artifact
            self._call("log_artifact", fn, str(path), artifact_path)

    def log_model(self, folder: str | Path, what: str) -> None:
        """Log an export (tokenizer or DiT folder with its safetensors) as an MLflow model and register it as
        `<experiment>-<what>`; the alias `latest-good` moves to this version (the stage finished cleanly)."""
        if self._mlflow is None or not self.enabled:
            return

        def log():
            import mlflow.pyfunc
            from aligntok.tracking import registry_model
            name = f"{self.params.tracking.experiment}-{what}"
            info = mlflow.pyfunc.log_model(name=what, python_model=registry_model.__file__,
                                           artifacts={"export": str(folder)}, registered_model_name=name,
                                           pip_requirements=[])
            mlflow.MlflowClient().set_registered_model_alias(name, "latest-good", info.registered_model_version)
        self._call("log_model", log)

    def log_dict(self, data: dict, name: str) -> None:
        if self._mlflow is not None:
            self._call("log_dict", self._mlflow.log_dict, data, name)

    def end(self, status: str = "FINISHED") -> None:
        if self.journal is not None:
            left = self.journal.close()
            if left:
                print(f"aligntok: {left} metric points of run {self.run_id} are not in MLflow yet (server away); "
                      f"they are kept in {self.journal.path}: run `aligntok tracking sync`", flush=True)
            else:
                self.journal.discard()
        if self._mlflow is not None:
            self._call("end_run", self._mlflow.end_run, status=status)


@contextlib.contextmanager
def stage_run(params: Params, stage: str, resume_run_id: str | None = None) -> Iterator[Tracker]:
    tracker = Tracker(params, stage)
    tracker.start(resume_run_id)
    try:
        yield tracker
    except BaseException as e:
        # SIGTERM (Prefect cancel, Slurm preemption) arrives as SystemExit, Ctrl-C as KeyboardInterrupt
        status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
        tracker.end(status)
        if tracker.run_id and not os.environ.get("ALIGNTOK_PARENT_RUN_ID"):
            parent = os.environ.get("ALIGNTOK_PARENT_RUN_ID_FOUND")
            end_parent_run(params, parent, status)
        raise
    else:
        tracker.end("FINISHED")
