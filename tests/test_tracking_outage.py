"""A real `mlflow server` on 127.0.0.1 dies during training and comes back: training never stalls, and afterwards
the run holds every metric point, those logged during the outage included (replayed from the local journal)."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
STEPS = 600

DRIVER = f"""
import json, sys, time, torch
from aligntok.config import load_params
from aligntok.tracking import stage_run
from aligntok.train.dist import DistInfo
from aligntok.train.loop import train
from tests.test_train_loop import Toy, ToyRecipe, cfg

class Slow(ToyRecipe):
    def losses(self, batch, step):
        time.sleep(0.03)  # a step that takes a while, so the outage falls mid-run
        print("STEP", step, time.monotonic(), flush=True)
        return super().losses(batch, step)

params = load_params("{ROOT}/profiles/ci.yaml", check_paths=False)
with stage_run(params, "train-dit") as tracker:
    out = train(Slow(), Toy(), cfg(steps={STEPS}, log_every=1, ckpt_every=10_000, ema_decay=None),
                dist=DistInfo(0, 1, 0, torch.device("cpu")), ckpt_dir=__import__("pathlib").Path("ckpt"),
                config_hash="h", seed=0, tracker=tracker, desc="train-dit")
    print("RUN", tracker.run_id, flush=True)
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(port: int, db: Path, art: Path, log) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(art),
                             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return proc
        except OSError:
            assert proc.poll() is None, "mlflow server exited at start"
            time.sleep(0.5)
    raise AssertionError("mlflow server did not start")


def _kill(proc: subprocess.Popen) -> None:
    """Stop a server we started through its own process group (never by name)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_server_dies_mid_run_and_comes_back(tmp_path):
    port, db, art = _port(), tmp_path / "mlflow.db", tmp_path / "artifacts"
    log = open(tmp_path / "server.log", "w")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALIGNTOK_", "MLFLOW_HTTP"))}
    env.update(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    server = _server(port, db, art, log)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    times, lines, killed_at, back_at = [], [], None, None
    try:
        for line in driver.stdout:
            lines.append(line)
            for step_s, t in re.findall(r"STEP (\d+) ([\d.]+)", line):  # the progress bar shares the line
                step = int(step_s)
                times.append(float(t))
                if step == 100 and killed_at is None:
                    _kill(server)  # the outage starts mid-run
                    killed_at = step
                if step == 300 and back_at is None:
                    server = _server(port, db, art, log)  # the same store comes back on the same port
                    back_at = step
        assert driver.wait(timeout=600) == 0, "".join(lines[-30:])
        out = "".join(lines)
        run_id = out.split("RUN ", 1)[1].split()[0]
        # never stalled: the longest gap between two steps stays far below MLflow's minutes of retries
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert max(gaps) < 15, max(gaps)
        if "tracking sync" in out:  # anything still unsent at the end is replayed by the CLI
            subprocess.run([sys.executable, "-m", "aligntok.cli", "tracking", "sync", "--params",
                            str(ROOT / "profiles/ci.yaml")], cwd=tmp_path, env=env, check=True, timeout=300)
        import mlflow
        client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        steps = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
        assert steps == list(range(1, STEPS + 1)), f"missing {sorted(set(range(1, STEPS + 1)) - set(steps))[:10]}"
        assert killed_at == 100 and back_at == 300
    finally:
        driver.kill()
        _kill(server)
        log.close()
