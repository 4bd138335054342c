import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

# Process-wide settings, made once at import (before any test module imports huggingface_hub), for every test and
# every subprocess a test starts. Offline is set, not defaulted: a shell with HF_HUB_OFFLINE=0 would otherwise let
# the tests reach the network. Tests that change the environment use monkeypatch.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")  # a slow machine may want more
os.environ.setdefault("TQDM_DISABLE", "1")
# Put the venv's console scripts (aligntok, dvc) first on PATH for subprocesses.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

# What a Slurm allocation or a torchrun worker exports. `aligntok <stage>` re-launches itself under torchrun or
# srun from these (aligntok/launch.py) and joins a process group from them (aligntok/train/dist.py), so tests run
# from such a shell (an salloc, a job script) would take other paths. Gone for the whole session; a test that needs
# them sets them itself (monkeypatch.setenv, or the env of the subprocess it starts).
LAUNCH_PREFIXES = ("SLURM_", "SLURMD_", "SRUN_", "TORCHELASTIC_")
LAUNCH_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
               "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCH_NCCL_ASYNC_ERROR_HANDLING", "ALIGNTOK_SRUN_STEP"}
for _var in list(os.environ):
    if _var.startswith(LAUNCH_PREFIXES) or _var in LAUNCH_VARS:
        del os.environ[_var]

ROOT = Path(__file__).resolve().parents[1]
# The profile tests load. Not the live params.yaml: users switch that one (`aligntok profile ci`).
SMOKE = ROOT / "profiles" / "smoke.yaml"


# Set in os.environ by pytest itself (the running test) and by libraries as a process-wide cache of a value that
# does not depend on the test (torch inductor's cache folder, computed once on first use; the address inductor hands
# the C++ wrapper it builds when its cache has no compiled kernel yet, so only a cold cache sets it).
NOT_LEFTOVERS = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"}


def _process_state() -> dict:
    """What one test could leave behind for the next in this process."""
    environ = {k: v for k, v in os.environ.items() if k not in NOT_LEFTOVERS}
    return {"environ": environ, "torch threads": torch.get_num_threads(), "cwd": os.getcwd()}


def _check_nothing_left(before: dict, where: str) -> None:
    """Put the process back as it was, then fail naming what was left changed: a later test must never see it."""
    after = _process_state()
    changed = []
    env_before, env_after = before["environ"], after["environ"]
    keys = sorted(k for k in env_before.keys() | env_after.keys() if env_before.get(k) != env_after.get(k))
    if keys:
        changed.append(f"os.environ {keys}")
        for k in keys:
            if k in env_before:
                os.environ[k] = env_before[k]
            else:
                del os.environ[k]
    if after["torch threads"] != before["torch threads"]:
        changed.append(f"torch threads {before['torch threads']} -> {after['torch threads']}")
        torch.set_num_threads(before["torch threads"])
    if after["cwd"] != before["cwd"]:
        changed.append(f"cwd {before['cwd']} -> {after['cwd']}")
        os.chdir(before["cwd"])
    if changed:
        pytest.fail(f"{where} left {'; '.join(changed)} (restored now). Use monkeypatch, the one_thread fixture, "
                    "or isolated_mlflow, which undo their changes.", pytrace=False)


@pytest.fixture(autouse=True)
def _no_leftovers_per_test():
    before = _process_state()
    yield
    _check_nothing_left(before, "this test")


@pytest.fixture(autouse=True, scope="module")
def _no_leftovers_per_module(request):
    """The same for module-scoped fixtures, which outlive each test."""
    before = _process_state()
    yield
    _check_nothing_left(before, f"a module-scoped fixture of {request.module.__name__}")


@contextlib.contextmanager
def single_thread():
    """Torch on one intra-op thread inside the block, the previous count restored after."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@pytest.fixture
def one_thread():
    """Pin torch to one intra-op thread for the test, restored afterwards: a training outcome then does not
    depend on the machine's core count or OMP_NUM_THREADS (reductions split over threads are summed in another
    order), tiny ops run faster, and shared cores are not oversubscribed. (Module-scoped fixtures: `with
    single_thread():` around their yield.)"""
    with single_thread():
        yield


@pytest.fixture
def isolated_mlflow(tmp_path, monkeypatch):
    """A private sqlite tracking DB so tests never touch the project's mlflow.db, and no pipeline/run ids or
    MLflow settings from the caller's shell (an exported MLFLOW_RUN_ID or ALIGNTOK_TRACKING=0 would change
    what the tests see). The test runs in tmp_path: what MLflow and the tracker write relative to the working
    directory (artifacts under ./mlruns, the metric journal under ./checkpoints/tracking) stays out of the
    checkout. Afterwards nothing the code under test exported is left: mlflow.set_experiment sets
    MLFLOW_EXPERIMENT_ID and mlflow.set_tracking_uri MLFLOW_TRACKING_URI in os.environ (for subprocesses), the
    tracker ALIGNTOK_PIPELINE_ID and ALIGNTOK_PARENT_RUN_ID_FOUND (for the stage's later runs)."""
    for var in list(os.environ):
        if var.startswith(("ALIGNTOK_", "MLFLOW_")) or var == "DVC_EXP_NAME":
            monkeypatch.delenv(var)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(tmp_path)
    yield uri
    if "mlflow" in sys.modules:  # the process-wide state mlflow keeps besides os.environ
        import mlflow
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)  # also unsets MLFLOW_TRACKING_URI; monkeypatch then restores the caller's
        import mlflow.tracking.fluent as fluent
        fluent._active_experiment_id = None
    for var in list(os.environ):
        if var.startswith(("ALIGNTOK_", "MLFLOW_")):
            os.environ.pop(var)  # the ones the test set with monkeypatch come back at its teardown
