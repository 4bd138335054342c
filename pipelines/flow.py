"""Prefect flow `aligntok-pipeline`: the dvc.yaml stages as Prefect tasks, in DAG order.

Each flow run works in its own run directory, a detached git worktree under `runs/<flow run>/`, so a
UI-triggered ablation never overwrites the workspace's results. The worktree shares the main DVC cache, so any
stage whose inputs and params are unchanged is restored from DVC's run-cache instead of recomputed, and DVC (not
Prefect) does all caching. Every stage runs as `dvc repro <stage>` in its own process group; its output streams
into the Prefect log, and cancelling or timing out kills the whole group (torchrun children included). A killed
stage is retried once in the same directory and resumes from its checkpoint; a flow run that fails or crashes
keeps its directory, so retrying that flow run resumes too.

No `from __future__ import annotations` here: Prefect builds the deployment's parameter model from the flow's
signature when a served deployment starts a run, and string annotations (`"PipelineParams"`) cannot be resolved
there; every UI-triggered run then failed parameter validation before any stage ran.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

import yaml
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

ROOT = Path(__file__).resolve().parents[1]


def dag_stages(dvc_yaml: Path = ROOT / "dvc.yaml") -> list[str]:
    """Stage names in dvc.yaml order (the file lists them in DAG order)."""
    return list(yaml.safe_load(dvc_yaml.read_text())["stages"])


Profile = Literal["smoke", "ci", "imagenet256"]  # profiles/<name>.yaml; a test keeps this list equal to the folder


class PipelineParams(BaseModel):
    """Shown as the run form in the Prefect UI (each field's description and type, choices as dropdowns)."""

    profile: Profile = Field("smoke", description="profiles/<name>.yaml to start from")
    semantic_weight: float | None = Field(None, ge=0, description="tokenizer.stage2.semantic_weight (0 = off)")
    encoder_arch: str | None = Field(None, description="encoder.arch, a timm model name")
    tokenizer_kind: Literal["aligntok", "vae"] | None = Field(
        None, description="tokenizer.kind: aligntok, or vae (the from-scratch baseline)")
    dit_model: str | None = Field(None, description="dit.model, e.g. tiny, LightningDiT-B/1")
    dit_steps: int | None = Field(None, gt=0, description="dit.steps")
    cfg_scale: float | None = Field(None, ge=1, description="eval.cfg_scale (the with-CFG row)")
    overrides: list[str] = Field(default_factory=list, description="free dotted.key=value overrides")
    stage_timeout_s: int | None = Field(None, gt=0, description="wall-clock limit of every stage in seconds; "
                                        "empty: each stage's from the profile (launcher.stage_timeout_h)")

    def as_overrides(self) -> list[str]:
        named = {"tokenizer.stage2.semantic_weight": self.semantic_weight, "encoder.arch": self.encoder_arch,
                 "tokenizer.kind": self.tokenizer_kind, "dit.model": self.dit_model, "dit.steps": self.dit_steps,
                 "eval.cfg_scale": self.cfg_scale}
        return [f"{k}={v}" for k, v in named.items() if v is not None] + list(self.overrides)


def deployment_parser(prog: str, description: str):
    """The options `pipelines.serve` and `pipelines.deploy` share: the deployment's name and the profile whose
    values fill the run form by default (every field can still be changed per run)."""
    import argparse
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--name", default="aligntok", help="deployment name (default: aligntok)")
    parser.add_argument("--profile", default="smoke", choices=Profile.__args__,
                        help="default profile in the run form (default: smoke)")
    return parser


def run_form_defaults(profile: str) -> dict:
    return {"params": PipelineParams(profile=profile).model_dump(mode="json")}


class StageFailed(RuntimeError):
    """A stage's command failed; `code` is the aligntok exit code when DVC reported it (else dvc's own)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


NO_RETRY = {2, 3}  # bad input or params, NaN/Inf stop: the same params would fail the same way again


def transient(task, task_run, state) -> bool:
    """Retry only what a rerun can fix (a killed or crashed process, a lost node), never bad input or divergence."""
    try:
        state.result()
    except StageFailed as e:
        return e.code not in NO_RETRY
    except Exception:  # noqa: BLE001 - anything else (OSError, a crash): worth one more try
        return True
    return False


def run_streaming(cmd: list[str], cwd: Path, env: dict, timeout_s: float, log) -> None:
    """Run `cmd` in a new process group, forward its lines to `log`, kill the group on timeout or cancel."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        _kill_group(proc)
    timer = threading.Timer(timeout_s, on_timeout)
    timer.start()
    tail: list[str] = []
    try:
        for line in proc.stdout:
            log(line.rstrip())
            tail = (tail + [line])[-50:]
        code = proc.wait()
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        timer.cancel()
    if code != 0:
        # dvc exits 255 whatever the stage did; its last lines carry the stage's own exit code
        found = re.findall(r"exited with (-?\d+)", "".join(tail))
        stage_code = int(found[-1]) if found else code
        why = (f" (killed: timeout after {timeout_s} s)" if timed_out.is_set()
               else f" (killed by signal {-code})" if code < 0 else "")  # preempted, OOM-killed: not a timeout
        raise StageFailed(f"{' '.join(cmd)} exited with {stage_code}{why}", stage_code)


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def prepare_run_dir(run_name: str, params: PipelineParams) -> Path:
    """A detached worktree of HEAD with the chosen profile + overrides written into its params.yaml."""
    from aligntok.config import load_params

    run_dir = ROOT / "runs" / run_name
    if not run_dir.exists():
        subprocess.run(["git", "worktree", "add", "--detach", "--force", str(run_dir), "HEAD"], cwd=ROOT,
                       check=True, capture_output=True)
    cache = ROOT / ".dvc" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([_dvc(), "cache", "dir", "--local", str(cache)], cwd=run_dir, check=True, capture_output=True)
    profile = ROOT / "profiles" / f"{params.profile}.yaml"
    if not profile.exists():
        raise ValueError(f"profile {params.profile!r} not found in {ROOT / 'profiles'}")
    tree = yaml.safe_load(profile.read_text())
    for item in params.as_overrides():
        key, raw = item.split("=", 1)
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    (run_dir / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    load_params(run_dir / "params.yaml", check_paths=False)  # fail before any stage runs
    return run_dir


def _dvc() -> str:
    exe = Path(sys.executable).parent / "dvc"
    return str(exe) if exe.exists() else "dvc"


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=transient)
def run_stage(stage: str, run_dir: str, env: dict, timeout_s: float) -> float:
    """`dvc repro <stage>` in the run directory; returns the subprocess's wall time in seconds."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    run_streaming([_dvc(), "repro", stage], Path(run_dir), env, timeout_s, logger.info)
    return time.perf_counter() - t0


def stage_timeouts(params: PipelineParams, resolved, stages: list[str]) -> dict[str, float]:
    """Each stage's wall-clock limit in seconds: the run form's stage_timeout_s for all, else the profile's
    launcher.stage_timeout_h (all of them known before the first stage starts)."""
    return {stage: params.stage_timeout_s or resolved.launcher.stage_timeout_h.seconds(stage) for stage in stages}


def run_name() -> str:
    """A readable flow-run name from the run form's values, e.g. `ci-semantic_weight=0-dit_steps=200`."""
    raw = (flow_run.get_parameters() or {}).get("params") or {}
    p = raw if isinstance(raw, PipelineParams) else PipelineParams.model_validate(raw)
    changed = [f"{k}={v}" for k, v in p.model_dump(exclude_defaults=True, exclude={"profile", "overrides",
                                                                                   "stage_timeout_s"}).items()]
    return "-".join([p.profile, *changed, *([f"{len(p.overrides)}-overrides"] if p.overrides else [])])


def metrics_table(metrics: dict) -> str:
    """The final metrics as a markdown table (numbers only; the protocol strings are in outputs/protocol/evaluate.json)."""
    rows = [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return "\n".join(["| metric | value |", "| --- | --- |", *rows])


@flow(name="aligntok-pipeline", log_prints=True, flow_run_name=run_name, persist_result=True)
def aligntok_pipeline(params: PipelineParams = PipelineParams()) -> dict:
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    from aligntok.config import load_params
    from aligntok.stages.repro import pipeline_env
    from aligntok.tracking import end_parent_run, redact, run_url, tracking_uri

    # the id keeps two runs with the same form values (same name) in separate worktrees
    name = f"prefect-{flow_run.get_name() or 'local'}-{(flow_run.get_id() or uuid.uuid4().hex)[:8]}"
    run_dir = prepare_run_dir(name, params)
    resolved = load_params(run_dir / "params.yaml", check_paths=False)
    env = pipeline_env(resolved, {"PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
                                  "DVC_EXP_NAME": name, "TQDM_MININTERVAL": "30"})  # a progress line per 30 s
    parent = env.get("ALIGNTOK_PARENT_RUN_ID")
    seconds, status = {}, "KILLED"
    try:
        for stage, timeout_s in stage_timeouts(params, resolved, dag_stages(run_dir / "dvc.yaml")).items():
            seconds[stage] = run_stage.with_options(name=stage)(stage, str(run_dir), env, timeout_s)
        status = "FINISHED"
    except Exception:
        status = "FAILED"
        raise
    finally:  # the MLflow parent run takes the flow's real status
        end_parent_run(resolved, parent, status)
        metrics = _read_metrics(run_dir)
        if status == "FINISHED":  # the worktree goes, its results stay
            archive_run_dir(run_dir)
        # a failed run keeps its worktree, checkpoints included: Retry (the UI's button) runs the same flow run in
        # the same directory, finished stages are skipped by DVC and the failed one resumes from its checkpoint
    create_markdown_artifact(markdown=metrics_table(metrics) + mlflow_note(resolved, parent), key="final-metrics",
                             description=f"evaluate.json of {run_dir.name}")
    if parent and tracking_uri(resolved).startswith("http"):
        create_link_artifact(key="mlflow-run", link=redact(run_url(resolved, parent)), link_text="MLflow parent run")
    return {"run_dir": str(run_dir), "stages": list(seconds), "stage_seconds": seconds, "metrics": metrics,
            "mlflow_parent_run": parent}


KEEP = ("params.yaml", "dvc.lock", "outputs/metrics", "outputs/protocol", "outputs/plots", "outputs/eval")


def _read_metrics(run_dir: Path) -> dict:
    path = run_dir / "outputs" / "metrics" / "evaluate.json"
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def archive_run_dir(run_dir: Path) -> None:
    """Replace the run's git worktree by its small results (params, dvc.lock, metrics, plots, grids).

    Models and latents stay in the shared DVC cache: `dvc checkout` with the kept dvc.lock brings them back.
    """
    keep = run_dir.with_name(run_dir.name + ".results")
    shutil.rmtree(keep, ignore_errors=True)
    for rel in KEEP:
        src, dst = run_dir / rel, keep / rel
        if src.is_dir():
            shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n.endswith((".npz", ".npy"))])
        elif src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    subprocess.run(["git", "worktree", "remove", "--force", str(run_dir)], cwd=ROOT, capture_output=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)
    if keep.exists():
        keep.rename(run_dir)


def mlflow_note(params, run_id: str | None) -> str:
    from aligntok.tracking import redact, tracking_uri
    if not run_id:
        return "\n\nMLflow was unreachable: metrics are in the run's outputs/metrics only."
    uri = redact(tracking_uri(params))
    how = uri if uri.startswith("http") else f"`mlflow ui --backend-store-uri {uri}`"
    return f"\n\nMLflow parent run `{run_id}` ({how})."


if __name__ == "__main__":
    aligntok_pipeline()
