"""Where tracking goes and what may be said about it: the tracking URI, the project root, git commits, redaction."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from aligntok.config import Params, flatten


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


def use_experiment(name: str) -> None:
    """mlflow.set_experiment, creating the experiment first with its artifacts in <project root>/mlruns when the
    store is local. MLflow would put them under ./mlruns of the process that creates it: the first stage of a
    `dvc exp run` (in .dvc/tmp/exps/<tmp>/) or of a Prefect run (in runs/<name>/), folders that are deleted
    afterwards, and every later run's artifacts (protocol.json, models, previews) were lost with them."""
    import mlflow
    from mlflow.exceptions import MlflowException
    if not mlflow.get_tracking_uri().startswith(("http:", "https:", "databricks")) and \
            mlflow.get_experiment_by_name(name) is None:
        try:
            mlflow.create_experiment(name, artifact_location=(project_root() / "mlruns").resolve().as_uri())
        except MlflowException:  # another stage process created it meanwhile
            pass
    mlflow.set_experiment(name)

def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"

def source_commit() -> str | None:
    """HEAD's commit (what `mlflow.source.git.commit` means), or None outside a git work tree."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|password|passwd|secret|key|sig|signature)=)[^&\s]+")


def redact(text: str) -> str:
    """Credentials in URIs (`https://user:pass@host`, `?token=...`) never reach logs, params, tags or artifacts."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", text))

def param_strings(params: Params) -> dict[str, str]:
    return {k: redact(str(v))[:500] for k, v in flatten(params.model_dump(mode="json")).items()}

def bound_http_retries() -> None:
    """Short HTTP timeouts and few retries (MLflow's defaults wait minutes on a dead server); users' values win."""
    for k, v in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}.items():
        os.environ.setdefault(k, v)

def _check_http(uri: str) -> None:
    import urllib.request
    urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=3).read()  # raises when unreachable
