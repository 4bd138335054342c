import os
import sys
from pathlib import Path

import pytest

# Offline and quiet, for every test and every subprocess a test starts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("TQDM_DISABLE", "1")
# Put the venv's console scripts (aligntok, dvc) first on PATH for subprocesses.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def isolated_mlflow(tmp_path, monkeypatch):
    """A private sqlite tracking DB so tests never touch the project's mlflow.db."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("ALIGNTOK_PARENT_RUN_ID", "ALIGNTOK_PIPELINE_ID"):
        monkeypatch.delenv(var, raising=False)
    return uri
