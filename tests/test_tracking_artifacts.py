"""Where a local MLflow store keeps artifacts: beside mlflow.db in the project root, whichever process creates the
experiment. A study's first stage runs in DVC's temporary copy (.dvc/tmp/exps/<tmp>/), a Prefect run's in its
worktree (runs/<name>/); MLflow's default (./mlruns of that process) put every later run's artifacts in a folder
that is deleted when the copy goes, so a study report found no protocol.json for its runs."""
import subprocess
import sys

import mlflow

from tests.conftest import ROOT

CREATE = """
import sys
import mlflow
from aligntok.tracking.uri import use_experiment
mlflow.set_tracking_uri(sys.argv[1])
use_experiment("study")
with mlflow.start_run():
    mlflow.log_dict({"profile": "smoke"}, "protocol.json")
"""


def test_an_experiment_created_in_a_dvc_temp_copy_keeps_its_artifacts_in_the_project_root(tmp_path):
    root = tmp_path / "project"
    temp_copy = root / ".dvc" / "tmp" / "exps" / "tmpabc123"
    temp_copy.mkdir(parents=True)
    db = f"sqlite:///{root / 'mlflow.db'}"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_DISABLE_TELEMETRY": "true"}
    for cwd in (temp_copy, root):  # the second process finds the experiment made by the first
        proc = subprocess.run([sys.executable, "-c", CREATE, db], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(db)
    exp = client.get_experiment_by_name("study")
    assert exp.artifact_location == (root / "mlruns").as_uri()
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2
    subprocess.run(["rm", "-rf", str(root / ".dvc")], check=True)  # DVC removes its temporary copy
    for run in runs:
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["protocol.json"]
