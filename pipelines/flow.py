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
import time
import uuid
from pathlib import Path
from typing import Literal

import yaml
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from pipelines.naming import cancel_requested, made_up, prefect_tags, tag_flow_run
from pipelines.overrides import overrides_schema, profile_values
from pipelines.stage_process import NO_RETRY, StageFailed, run_streaming, transient

ROOT = Path(__file__).resolve().parents[1]


def dag_stages(dvc_yaml: Path = ROOT / "dvc.yaml") -> list[str]:
    """Stage names in dvc.yaml order (the file lists them in DAG order)."""
    return list(yaml.safe_load(dvc_yaml.read_text())["stages"])


Profile = Literal["smoke", "ci", "imagenet256", "t2i-smoke", "t2i-laion256"]  # profiles/<name>.yaml; a test keeps this list equal to the folder


def _keeps(key: str) -> str:
    return f"; empty: the profile's ({profile_values(key, Profile.__args__)})"


def _form_schema(schema: dict) -> None:
    """An optional field is shown as its own type (a number box, a text box, a choice) that may be left empty, not as
    the union `float | None` with a second alternative "Property is type None": an empty field is left out of the
    run's parameters and keeps the profile's value (the model's default None)."""
    for field in schema.get("properties", {}).values():
        alts = field.get("anyOf", [])
        real = [a for a in alts if a.get("type") != "null"]
        if len(alts) == 2 and len(real) == 1:
            del field["anyOf"]
            field.update(real[0])
            field.pop("default", None)


class PipelineParams(BaseModel):
    """This run's settings: a profile, and any of its values to change. An empty field keeps the profile's value."""

    model_config = ConfigDict(json_schema_extra=_form_schema)

    profile: Profile = Field("smoke", title="Profile", description="the profile to start from: profiles/smoke.yaml "
                             "(CPU, minutes), profiles/ci.yaml (the tests' tiny one), profiles/imagenet256.yaml "
                             "(the paper's), profiles/t2i-smoke.yaml (text-to-image on CPU) or "
                             "profiles/t2i-laion256.yaml (the paper's text-to-image)")
    task: Literal["class", "text"] | None = Field(
        None, title="Task", description="task: class (class-conditional) or text (text-to-image; needs a captioned "
        "data source)" + _keeps("task"))
    semantic_weight: float | None = Field(None, title="Semantic weight", ge=0,
                                          description="tokenizer.stage2.semantic_weight, >= 0 (0 = off)"
                                          + _keeps("tokenizer.stage2.semantic_weight"))
    encoder_arch: str | None = Field(None, title="Encoder architecture",
                                     description="encoder.arch, a timm model name" + _keeps("encoder.arch"))
    tokenizer_kind: Literal["aligntok", "vae", "external"] | None = Field(
        None, title="Tokenizer kind",
        description="tokenizer.kind: aligntok, vae (the from-scratch baseline) or external (a pretrained "
        "AutoencoderKL named by tokenizer.external, e.g. the FLUX VAE)" + _keeps("tokenizer.kind"))
    dit_model: str | None = Field(None, title="DiT model",
                                  description="dit.model, e.g. tiny, LightningDiT-B/1" + _keeps("dit.model"))
    dit_steps: int | None = Field(None, title="DiT steps", gt=0,
                                  description="dit.steps, a whole number > 0" + _keeps("dit.steps"))
    cfg_scale: float | None = Field(None, title="CFG scale", ge=1,
                                    description="eval.cfg_scale, the guidance scale of the with-CFG metrics, >= 1"
                                    + _keeps("eval.cfg_scale"))
    overrides: list[str] = Field(default_factory=list, title="Other changes",
                                 json_schema_extra={"items": overrides_schema()},
                                 description="any other param as dotted.key=value, e.g. dit.lr=2e-4: a known key and "
                                 "a value it accepts (type, choices, bounds such as > 0), else the run is refused")
    stage_timeout_s: int | None = Field(None, title="Stage timeout (s)", gt=0,
                                        description="wall-clock limit of every stage in seconds, > 0; empty: each "
                                        "stage's from the profile (launcher.stage_timeout_h)")

    def as_overrides(self) -> list[str]:
        named = {"task": self.task, "tokenizer.stage2.semantic_weight": self.semantic_weight, "encoder.arch": self.encoder_arch,
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
    parser.add_argument("--concurrency", type=int, default=1,
                        help="runs at once (default: 1; each stage uses every core, so later runs wait for a slot)")
    return parser


def run_form_defaults(profile: str) -> dict:
    return {"params": PipelineParams(profile=profile).model_dump(mode="json", exclude_none=True)}


def prepare_run_dir(run_name: str, params: PipelineParams) -> Path:
    """A detached worktree of HEAD with the chosen profile + overrides written into its params.yaml."""
    from aligntok.config import load_params

    profile = ROOT / "profiles" / f"{params.profile}.yaml"
    if not profile.exists():
        raise ValueError(f"profile {params.profile!r} not found in {ROOT / 'profiles'}")
    load_params(profile, params.as_overrides(), check_paths=False)  # a ConfigError before any worktree or stage
    run_dir = ROOT / "runs" / run_name
    if not run_dir.exists():
        subprocess.run(["git", "worktree", "add", "--detach", "--force", str(run_dir), "HEAD"], cwd=ROOT,
                       check=True, capture_output=True)
    cache = ROOT / ".dvc" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([_dvc(), "cache", "dir", "--local", str(cache)], cwd=run_dir, check=True, capture_output=True)
    tree = yaml.safe_load(profile.read_text())
    for item in params.as_overrides():
        key, raw = item.split("=", 1)
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    (run_dir / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    return run_dir


def _dvc() -> str:
    exe = Path(sys.executable).parent / "dvc"
    return str(exe) if exe.exists() else "dvc"


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=transient)
def run_stage(stage: str, run_dir: str, env: dict, timeout_s: float) -> float:
    """`dvc repro <stage>` in the run directory; returns the subprocess's wall time in seconds. A config error or
    a NaN stop ends the task as Failed with the stage's one line (no traceback: it says all there is)."""
    from prefect.exceptions import TerminationSignal
    from prefect.states import Cancelled, Failed
    logger = get_run_logger()
    t0 = time.perf_counter()
    try:
        run_streaming([_dvc(), "repro", stage], Path(run_dir), env, timeout_s, logger.info)
    except StageFailed as e:
        if e.code not in NO_RETRY:
            raise
        return Failed(message=str(e), data=e)
    except TerminationSignal:  # the UI's Cancel (or a preemption) stopped the stage's processes: not a crash
        return Cancelled(message=f"{stage} stopped")
    return time.perf_counter() - t0


def config_error(state) -> bool:
    """Whether a stage's failed state is a config error: a retry of the same params fails alike, so its worktree
    (nothing in it but the params) is not kept for one."""
    error = state.result(raise_on_failure=False) if state is not None else None
    return isinstance(error, StageFailed) and error.code == 2


def stage_timeouts(params: PipelineParams, resolved, stages: list[str]) -> dict[str, float]:
    """Each stage's wall-clock limit in seconds: the run form's stage_timeout_s for all, else the profile's
    launcher.stage_timeout_h (all of them known before the first stage starts)."""
    return {stage: params.stage_timeout_s or resolved.launcher.stage_timeout_h.seconds(stage) for stage in stages}


def run_name() -> str:
    """A readable flow-run name from the run form's values, e.g. `ci-semantic_weight=0-dit_steps=200-dit.lr=1e-4`;
    a name the user typed in the form is kept."""
    if not made_up(flow_run.get_name()):
        return flow_run.get_name()
    raw = (flow_run.get_parameters() or {}).get("params") or {}
    p = raw if isinstance(raw, PipelineParams) else PipelineParams.model_validate(raw)
    changed = [f"{k}={v}" for k, v in p.model_dump(exclude_defaults=True, exclude={"profile", "overrides",
                                                                                   "stage_timeout_s"}).items()]
    return "-".join([p.profile, *changed, *p.overrides])


def metrics_table(metrics: dict) -> str:
    """The final metrics as a markdown table (numbers only; the protocol strings are in outputs/protocol/evaluate.json)."""
    rows = [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return "\n".join(["| metric | value |", "| --- | --- |", *rows])


@flow(name="aligntok-pipeline", log_prints=True, flow_run_name=run_name, persist_result=True)
def aligntok_pipeline(params: PipelineParams = PipelineParams()) -> dict:
    from prefect.artifacts import create_link_artifact, create_markdown_artifact
    from prefect.exceptions import TerminationSignal
    from prefect.states import Cancelled, Failed

    from aligntok.config import ConfigError, load_params
    from aligntok.stages.repro import pipeline_env
    from aligntok.tracking import finish_pipeline

    tag_flow_run(params.profile, Profile.__args__)
    # the id keeps two runs with the same form values (same name) in separate worktrees
    name = f"prefect-{flow_run.get_name() or 'local'}-{(flow_run.get_id() or uuid.uuid4().hex)[:8]}"
    name = re.sub(r"[^\w.=+-]", "_", name)  # a folder name: an override's path (data.root=/x) has slashes
    try:
        run_dir = prepare_run_dir(name, params)
    except ConfigError as e:  # one line, no traceback, no worktree: nothing ran
        get_run_logger().error(f"config error: {e}")
        return Failed(message=f"config error: {e}")
    resolved = load_params(run_dir / "params.yaml", check_paths=False)
    env = pipeline_env(resolved, {"PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
                                  "DVC_EXP_NAME": name, "TQDM_MININTERVAL": "30"},  # a progress line per 30 s
                       name=flow_run.get_name(), tags=prefect_tags(), workdir=run_dir)
    parent = env.get("ALIGNTOK_PARENT_RUN_ID")
    seconds, status, failed, cancelled = {}, "KILLED", None, None
    try:
        for stage, timeout_s in stage_timeouts(params, resolved, dag_stages(run_dir / "dvc.yaml")).items():
            state = run_stage.with_options(name=stage)(stage, str(run_dir), env, timeout_s, return_state=True)
            if state.is_cancelled():  # its processes were stopped by a SIGTERM: the UI's Cancel, or a preemption
                if not cancel_requested():
                    raise TerminationSignal(signal.SIGTERM)  # Prefect's engine: Crashed, and Retry resumes
                cancelled = f"cancelled during {stage}"
                break
            if not state.is_completed():
                failed, failed_stage = state, stage
                break
            seconds[stage] = state.result()
        status = "KILLED" if cancelled else "FAILED" if failed else "FINISHED"
    except Exception:
        status = "FAILED"
        raise
    finally:  # the MLflow parent run takes the flow's real status, with what the pipeline produced
        finish_pipeline(resolved, parent, status, run_dir, stages=list(seconds))
        metrics = _read_metrics(run_dir)
        if status == "FINISHED" or config_error(failed):  # the worktree goes, its results stay
            archive_run_dir(run_dir)
        # a failed run keeps its worktree, checkpoints included: Retry (the UI's button) runs the same flow run in
        # the same directory, finished stages are skipped by DVC and the failed one resumes from its checkpoint
    if cancelled:  # ends Cancelled, not Crashed (its worktree stays: Retry resumes it)
        return Cancelled(message=cancelled)
    create_markdown_artifact(markdown=metrics_table(metrics) + mlflow_note(resolved, parent), key="final-metrics",
                             description=f"evaluate.json of {run_dir.name}")
    if link := mlflow_link(resolved, parent):  # a local store's opens once `mlflow ui` runs (the note says so)
        create_link_artifact(key="mlflow-run", link=link, link_text="MLflow parent run")
    if failed:  # the failed stage's one line (a config error, a NaN stop, the exit code), not a traceback
        return Failed(message=f"{failed_stage}: {failed.message}")
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


def mlflow_link(params, run_id: str | None) -> str | None:
    """The parent run's page in the MLflow UI, or None when MLflow is away."""
    from aligntok.tracking import redact, run_url
    try:
        return redact(run_url(params, run_id)) if run_id else None
    except Exception:  # noqa: BLE001 - the run's results are in its outputs whatever MLflow does
        return None


def mlflow_note(params, run_id: str | None) -> str:
    from aligntok.tracking import tracking_uri, ui_command
    link = mlflow_link(params, run_id)
    if not link:
        return "\n\nMLflow was unreachable: metrics are in the run's outputs/metrics only."
    local = "" if tracking_uri(params).startswith("http") else f" (start the UI first: `{ui_command(params)}`)"
    return f"\n\nMLflow parent run: [{run_id}]({link}){local}."


if __name__ == "__main__":
    aligntok_pipeline()
