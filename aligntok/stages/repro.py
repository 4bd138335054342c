"""`aligntok repro [dvc args]`: `dvc repro` under one MLflow parent run (its stages become child runs)."""
from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

from aligntok.config import Params


def pipeline_env(params: Params, extra: dict[str, str] | None = None, name: str | None = None,
                 tags: dict[str, str] | None = None, workdir: Path = Path(".")) -> dict[str, str]:
    """Environment for a pipeline execution: a fresh pipeline id and its parent run (when MLflow is up), named
    `name` or after the DVC experiment (DVC_EXP_NAME in `extra`) and tagged with `tags`."""
    from aligntok.tracking import create_parent_run

    env = dict(os.environ, **(extra or {}))
    env["ALIGNTOK_PIPELINE_ID"] = env.get("ALIGNTOK_PIPELINE_ID") or f"pipeline-{uuid.uuid4().hex[:12]}"
    os.environ["ALIGNTOK_PIPELINE_ID"] = env["ALIGNTOK_PIPELINE_ID"]
    try:
        env["ALIGNTOK_PARENT_RUN_ID"] = create_parent_run(params, env["ALIGNTOK_PIPELINE_ID"], name=name, tags=tags,
                                                          env=env, workdir=workdir)
    except Exception as e:  # noqa: BLE001 - tracking outage: stages still run and write local metrics
        print(f"aligntok: MLflow unavailable ({type(e).__name__}); continuing without a parent run")
    return env


def run(params: Params, args) -> int:
    from aligntok.tracking import finish_pipeline

    env = pipeline_env(params)
    cmd = ["dvc", "repro", *[a for a in args.dvc_args if a != "--"]]
    print("+", " ".join(cmd), f"(MLflow parent run {env.get('ALIGNTOK_PARENT_RUN_ID', 'none')})", flush=True)
    code = 130
    try:
        code = subprocess.call(cmd, env=env)
    finally:  # the parent run stays RUNNING while the stages run, then takes the pipeline's real status
        finish_pipeline(params, env.get("ALIGNTOK_PARENT_RUN_ID"),
                        "FINISHED" if code == 0 else "KILLED" if code in (130, 143, -2, -15) else "FAILED")
    return code
