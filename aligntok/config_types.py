"""The params' building blocks (field types, ConfigError, Section, dotted-key helpers) and the sections that say how a run is carried out
(launcher, Prefect stage timeouts, tracking); `aligntok.config` holds the rest and re-exports these."""
from __future__ import annotations

from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


# eval.reference for our own statistics of the prepared train split (not a file)
OWN_REFERENCE = "own"
ADM_REFERENCE_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                     "VIRTUAL_imagenet256_labeled.npz")


class ConfigError(ValueError):
    """A params problem, reported as one line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # lr: .inf is a typo


class StageTimeouts(Section):
    """Wall-clock hours the Prefect flow gives each dvc.yaml stage before it kills the stage (then retries it once)."""

    prepare: PosFloat = 6
    judge: PosFloat = 6
    tokenizer_stage1: PosFloat = 6
    tokenizer_stage2: PosFloat = 6
    tokenizer_stage3: PosFloat = 6
    cache_latents: PosFloat = 6
    cache_text: PosFloat = 6
    train_dit: PosFloat = 6
    evaluate: PosFloat = 6

    def seconds(self, stage: str) -> float:
        """The limit of dvc.yaml stage `stage` (e.g. 'train-dit') in seconds."""
        return 3600 * getattr(self, stage.replace("-", "_"))


class LauncherConfig(Section):
    """How a stage starts its processes: one, torchrun on one node, torchrun on several nodes, or under Slurm.

    Multi-node without a scheduler: start the same stage command on every node with the same launcher values
    (torchrun's c10d rendezvous at `rdzv_endpoint` joins them). Under Slurm (`sbatch` from
    `pipelines/slurm/dvc-repro.sbatch`), the node count, rendezvous id and endpoint come from SLURM_* and the
    stage starts one torchrun per node through `srun`.
    """

    nproc_per_node: PosInt = 1  # processes (GPUs) per node
    nnodes: PosInt = 1  # nodes; > 1 needs rdzv_endpoint (or a Slurm allocation)
    rdzv_endpoint: str | None = None  # host:port on node 0 that every node reaches, e.g. gpu-node-0:29500
    rdzv_id: str = "aligntok"  # one id per job; every node uses the same
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # how long a rank waits in a collective (NCCL's own default, 10 min, is shorter than rank 0 alone saving and
    # hashing a paper-size checkpoint or verifying one on resume); a dead rank is still caught at once by torchrun
    timeout_s: PosInt = 3600
    stage_timeout_h: StageTimeouts = StageTimeouts()


class TrackingConfig(Section):
    experiment: str = "aligntok"
    uri: str | None = None  # null: sqlite:///<project>/mlflow.db (MLFLOW_TRACKING_URI overrides)


def _without(tree: Any, drop: frozenset) -> Any:
    if isinstance(tree, dict):
        return {k: _without(v, drop) for k, v in tree.items() if k not in drop}
    return tree


def get_dotted(tree: dict, key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _set_dotted(tree: dict, key: str, raw: str) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: override given, but {'.'.join(parts[:-1])} is not a section")
        node = child
    # YAML parsing gives `-S x=3` an int, `-S x=null` None, `-S x=[1,2]` a list, like dvc's -S.
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""


def _describe(err: dict) -> str:
    key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-after", "literal", "int", "str")))
    given = err.get("input")
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key (given {given!r}); expected one of the documented params"
    if err["type"] == "missing":
        return f"{key}: missing; expected a value"
    if err["type"] == "value_error" and msg.startswith("Value error, ") and ": " in msg:  # our own validators
        return msg.removeprefix("Value error, ")
    return f"{key}: given {given!r}; expected {msg[0].lower() + msg[1:]}"
