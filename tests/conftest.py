import os
import sys
from pathlib import Path

import pytest
import torch

# Process-wide defaults, set once at import (before any test module imports huggingface_hub): offline and
# quiet for every test and every subprocess a test starts. Tests that change the environment use monkeypatch.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("TQDM_DISABLE", "1")
# Put the venv's console scripts (aligntok, dvc) first on PATH for subprocesses.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

ROOT = Path(__file__).resolve().parents[1]
# The profile tests load. Not the live params.yaml: users switch that one (`aligntok profile ci`).
SMOKE = ROOT / "profiles" / "smoke.yaml"


@pytest.fixture
def one_thread():
    """Pin torch to one intra-op thread for the test, restored afterwards: a training outcome then does not
    depend on the machine's core count or OMP_NUM_THREADS (reductions split over threads are summed in another
    order), tiny ops run faster, and shared cores are not oversubscribed."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture
def isolated_mlflow(tmp_path, monkeypatch):
    """A private sqlite tracking DB so tests never touch the project's mlflow.db, and no pipeline/run ids or
    MLflow settings from the caller's shell (an exported MLFLOW_RUN_ID or ALIGNTOK_TRACKING=0 would change
    what the tests see)."""
    for var in list(os.environ):
        if var.startswith(("ALIGNTOK_", "MLFLOW_")) or var == "DVC_EXP_NAME":
            monkeypatch.delenv(var)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return uri
