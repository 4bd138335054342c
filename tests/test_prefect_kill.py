"""Kills during a Prefect flow run, on the Prefect path a UI user takes: a real `prefect server` on 127.0.0.1, the
deployment served with `python -m pipelines.serve`, runs created (and retried) over the HTTP API as the UI's
buttons do.

- The stage's processes die (preemption, the OOM killer): Prefect retries the task in the same run directory,
  the stage resumes from its last checkpoint instead of step 0, and the run ends COMPLETED with a DiT
  bit-identical to one trained without the kill.
- The flow-run process dies with the stage (a lost node): the run is CRASHED; Retry runs it again in the same
  directory, finished stages are skipped, the killed one resumes, and the run ends COMPLETED.
"""
import hashlib
import os
import random
import signal
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from tests.test_pipeline import STAGES, sh
from tests.prefect_harness import TERMINAL, _api, _task_states, served  # noqa: F401 - `served` is a fixture

pytestmark = pytest.mark.slow

STEPS, EVERY = 60, 5
FORM = {"profile": "ci", "dit_steps": STEPS,
        "overrides": [f"dit.ckpt_every={EVERY}", f"dit.log_every={EVERY}", f"dit.image_every={STEPS}"]}


def _stage_group(run_dir: Path, stage: str) -> int:
    """The process group of `dvc repro <stage>` running in `run_dir` (the flow starts it as a group leader)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(proc / "cwd")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if b"repro" in argv and stage.encode() in argv and Path(cwd) == run_dir:
            pid = int(proc.name)
            assert os.getpgid(pid) == pid, "dvc repro is not its group's leader"
            return pid
    raise AssertionError(f"no `dvc repro {stage}` process in {run_dir}")


def _logs(served, flow_run_id: str) -> list[str]:
    out, offset = [], 0
    while True:
        page = _api(served["api"], "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                                    "offset": offset, "limit": 200, "sort": "TIMESTAMP_ASC"})
        out += [row["message"] for row in page]
        if len(page) < 200:
            return out
        offset += len(page)


def _start_and_wait_for_checkpoint(served, form: dict, seed: str) -> tuple[dict, Path]:
    """Create a flow run; return it and its run directory once train-dit has written a checkpoint at or past a
    seeded random step (the moment of the kill)."""
    api = served["api"]
    run = _api(api, f"/deployments/{served['deployment']['id']}/create_flow_run", {"parameters": {"params": form}})
    kill_after = EVERY * random.Random(seed).randint(1, form["dit_steps"] // EVERY // 2)
    deadline = time.monotonic() + 1200
    while True:
        found = [p for p in (served["repo"] / "runs").glob("*/checkpoints/train-dit/step-*")
                 if p.parents[2].name.endswith(run["id"][:8])]  # runs/prefect-<name>-<id[:8]>
        if found and max(int(p.name[5:]) for p in found) >= kill_after:
            return run, found[0].parents[2]
        state = _api(api, f"/flow_runs/{run['id']}")["state"]["type"]
        assert state not in TERMINAL, f"flow run {state} before the kill:\n" + served["log"].read_text()[-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _newest_checkpoint(run_dir: Path) -> int:
    return max(int(p.name[5:]) for p in (run_dir / "checkpoints/train-dit").glob("step-*"))


def _wait(served, run_id: str, timeout_s: float = 1200) -> dict:
    deadline = time.monotonic() + timeout_s
    while (run := _api(served["api"], f"/flow_runs/{run_id}"))["state"]["type"] not in TERMINAL:
        assert time.monotonic() < deadline, served["log"].read_text()[-4000:]
        time.sleep(2)
    return run


def _resumed_at(served, run_id: str) -> int:
    """The step train-dit said it resumed at, from the flow run's Prefect log (exactly one resume)."""
    logs = "\n".join(_logs(served, run_id))
    resumed = [ln for ln in logs.splitlines() if "aligntok: train-dit: resuming at step" in ln]
    assert len(resumed) == 1, logs[-4000:]
    step = int(resumed[0].split("resuming at step ")[1].split()[0])
    assert resumed[0].endswith(f"step-{step:08d}")
    return step


def test_stage_killed_mid_flow_resumes_from_its_checkpoint(served, tmp_path):
    api, repo, env = served["api"], served["repo"], served["env"]
    run, run_dir = _start_and_wait_for_checkpoint(served, FORM, "prefect-kill-stage")
    os.killpg(_stage_group(run_dir, "train-dit"), signal.SIGKILL)
    at_kill = _newest_checkpoint(run_dir)
    assert at_kill < STEPS, "train-dit finished before the kill; lengthen it"

    run = _wait(served, run["id"])
    assert run["state"]["type"] == "COMPLETED", served["log"].read_text()[-4000:]
    assert _task_states(served, run["id"]) == {s: "COMPLETED" for s in STAGES}
    tasks = _api(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    by_length = sorted(STAGES, key=len, reverse=True)  # task runs are named "<stage>-<short id>"
    tries = {next(s for s in by_length if t["name"].startswith(s + "-")): t["run_count"] for t in tasks}
    assert tries == {s: 2 if s == "train-dit" else 1 for s in STAGES}  # Prefect retried the killed stage only
    assert _resumed_at(served, run["id"]) == at_kill  # the newest checkpoint, not step 0

    # the resumed DiT against one trained without a kill, on the same inputs and params, in the same environment
    results = run_dir  # the flow kept params.yaml and dvc.lock there; models are in the shared DVC cache
    check = tmp_path / "check"
    sh(["git", "worktree", "add", "--detach", str(check), "HEAD"], repo)
    try:
        for name in ("params.yaml", "dvc.lock"):
            shutil.copy2(results / name, check / name)
        sh(["dvc", "cache", "dir", "--local", str(repo / ".dvc" / "cache")], check, env)
        sh(["dvc", "checkout"], check, env)
        resumed_weights = hashlib.sha256((check / "outputs/dit/model/model.safetensors").read_bytes()).hexdigest()
        assert yaml.safe_load((results / "outputs/metrics/train-dit.json").read_text())["steps"] == STEPS
        sh([sys.executable, "-m", "aligntok.cli", "train-dit"], check, dict(env, ALIGNTOK_TRACKING="0"))
        fresh = hashlib.sha256((check / "outputs/dit/model/model.safetensors").read_bytes()).hexdigest()
        assert resumed_weights == fresh
    finally:
        sh(["git", "worktree", "remove", "--force", str(check)], repo, check=False)


def test_flow_process_killed_then_retried_resumes_the_stage(served):
    """A lost node: the flow-run process and the stage die together. Retry (the UI's button on the crashed run)
    runs the same flow run again in the same directory; train-dit resumes. Other train-dit steps than the first
    test's, so DVC's run-cache cannot restore it."""
    api = served["api"]
    form = {**FORM, "dit_steps": STEPS - 2 * EVERY}
    run, run_dir = _start_and_wait_for_checkpoint(served, form, "prefect-kill-flow")
    group = _stage_group(run_dir, "train-dit")
    flow_pid = int(next(ln.split()[1] for ln in Path(f"/proc/{group}/status").read_text().splitlines()
                        if ln.startswith("PPid:")))
    assert b"pipelines.serve" not in Path(f"/proc/{flow_pid}/cmdline").read_bytes()  # the run's own process
    os.kill(flow_pid, signal.SIGKILL)
    os.killpg(group, signal.SIGKILL)
    at_kill = _newest_checkpoint(run_dir)
    assert at_kill < form["dit_steps"], "train-dit finished before the kill; lengthen it"
    crashed = _wait(served, run["id"])
    assert crashed["state"]["type"] in ("CRASHED", "FAILED"), crashed["state"]

    now = datetime.now(timezone.utc).isoformat()
    _api(api, f"/flow_runs/{run['id']}/set_state", {"state": {"type": "SCHEDULED", "name": "AwaitingRetry",
                                                              "state_details": {"scheduled_time": now}},
                                                    "force": True})
    run = _wait(served, run["id"])
    assert run["state"]["type"] == "COMPLETED", served["log"].read_text()[-4000:]
    assert run["run_count"] >= 2
    assert _resumed_at(served, run["id"]) == at_kill
    steps = yaml.safe_load((run_dir / "outputs/metrics/train-dit.json").read_text())["steps"]
    assert steps == form["dit_steps"]
