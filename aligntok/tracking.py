"""MLflow tracking: the only module that imports mlflow.

One parent run per pipeline execution, one child run per stage. DVC runs every stage in its own process, so
the parent is found through a pipeline id: `ALIGNTOK_PARENT_RUN_ID` (set by `aligntok repro` and the Prefect
flow) wins; else `ALIGNTOK_PIPELINE_ID`; else the id of the `dvc repro`/`dvc exp run` process this stage runs
under (pid + start time, read from /proc). A tracking outage warns once and never fails the stage: metrics
always also land in the stage's local metrics/plots files. Metric points go through a local journal and a
background sender (`tracking_journal`), so a server outage mid-run neither stalls training nor loses points.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator

from aligntok.config import Params, flatten

PIPELINE_ROLE = "pipeline"


def project_root() -> Path:
    """The main work tree, so runs in copies of it log into the same mlflow.db: `dvc exp run --temp` works in
    <root>/.dvc/tmp/exps/<tmp>/ (a clone of its own), git worktrees (Prefect runs) share the main .git."""
    cwd = Path.cwd().resolve()
    if ".dvc" in cwd.parts:
        i = cwd.parts.index(".dvc")
        if cwd.parts[i + 1:i + 3] == ("tmp", "exps"):
            return Path(*cwd.parts[:i])
    try:
        common = subprocess.run(["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
                                capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        return Path(common).parent
    except (OSError, subprocess.SubprocessError):
        return Path.cwd()


def tracking_uri(params: Params) -> str:
    return (os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri
            or f"sqlite:///{project_root() / 'mlflow.db'}")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|password|passwd|secret|key|sig|signature)=)[^&\s]+")


def redact(text: str) -> str:
    """Credentials in URIs (`https://user:pass@host`, `?token=...`) never reach logs, params, tags or artifacts."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


def param_strings(params: Params) -> dict[str, str]:
    return {k: redact(str(v))[:500] for k, v in flatten(params.model_dump(mode="json")).items()}


def source_commit() -> str | None:
    """HEAD's commit (what `mlflow.source.git.commit` means), or None outside a git work tree."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


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
            mlflow.set_experiment(self.params.tracking.experiment)
            self._mlflow = mlflow
            if resume_run_id:
                run = mlflow.start_run(run_id=resume_run_id)
            else:
                parent = self._parent_run_id()
                run = mlflow.start_run(run_name=self.stage, parent_run_id=parent, log_system_metrics=True)
                mlflow.log_params(param_strings(self.params))
                self._log_sources()
            mlflow.set_tags(self._tags())
            self.run_id = run.info.run_id
            from aligntok.tracking_journal import MetricJournal
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
                "stage": self.stage, "profile": self.params.profile, "git_commit": git_commit(),
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


def bound_http_retries() -> None:
    """Short HTTP timeouts and few retries (MLflow's defaults wait minutes on a dead server); users' values win."""
    for k, v in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}.items():
        os.environ.setdefault(k, v)


def send_metrics(run_id: str, points: list[dict]) -> None:
    import mlflow
    from mlflow.entities import Metric
    mlflow.MlflowClient().log_batch(run_id, metrics=[Metric(p["key"], p["value"], p["timestamp"], p["step"])
                                                     for p in points], synchronous=True)


def sync_journals(params: Params) -> int:
    """`aligntok tracking sync`: send every journaled metric point that MLflow has not accepted yet."""
    import mlflow
    from aligntok.tracking_journal import JOURNAL_DIR, flush_journal
    uri = tracking_uri(params)
    if uri.startswith("http"):
        bound_http_retries()
    mlflow.set_tracking_uri(uri)
    total = 0
    for path in sorted(JOURNAL_DIR.glob("*.jsonl")):
        sent = flush_journal(path, path.with_suffix(".sent"), path.stem, send_metrics)
        total += sent
        print(f"{path.stem}: {sent} metric points sent")
    return total


def _check_http(uri: str) -> None:
    import urllib.request
    urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=3).read()  # raises when unreachable


def create_parent_run(params: Params, pid: str | None = None) -> str:
    """Create the pipeline's parent run (ended at once; children attach by id) and return its id."""
    import mlflow
    mlflow.set_tracking_uri(tracking_uri(params))
    mlflow.set_experiment(params.tracking.experiment)
    pid = pid or os.environ.get("ALIGNTOK_PIPELINE_ID") or f"pipeline-{uuid.uuid4().hex[:12]}"
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(params.tracking.experiment)
    name = os.environ.get("DVC_EXP_NAME") or f"{params.profile}-{time.strftime('%Y%m%d-%H%M%S')}"
    head = source_commit()
    run = client.create_run(exp.experiment_id, run_name=name,
                            tags={"role": PIPELINE_ROLE, "pipeline_id": pid, "profile": params.profile,
                                  "git_commit": git_commit(), "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
                                  **({"mlflow.source.git.commit": head} if head else {})})
    from mlflow.entities import Param
    items = [Param(k, v) for k, v in param_strings(params).items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start:start + 100])
    for name in ("params.yaml", "dvc.lock"):
        if Path(name).is_file():
            client.log_text(run.info.run_id, redact(Path(name).read_text()), f"config/{name}")
    return run.info.run_id  # stays RUNNING until the pipeline ends (end_parent_run)


def run_url(params: Params, run_id: str) -> str:
    """The run's page in the MLflow UI of an HTTP tracking server."""
    import mlflow
    mlflow.set_tracking_uri(tracking_uri(params))
    run = mlflow.MlflowClient().get_run(run_id)
    return f"{tracking_uri(params).rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


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


def search_runs(params: Params, experiment: str | None = None) -> list[Any]:
    """All runs of an experiment as mlflow Run objects (for `aligntok compare`)."""
    import mlflow
    mlflow.set_tracking_uri(tracking_uri(params))
    exp = mlflow.get_experiment_by_name(experiment or params.tracking.experiment)
    if exp is None:
        return []
    return mlflow.MlflowClient().search_runs([exp.experiment_id], max_results=5000)
