"""Re-launch a distributed stage under torchrun: one node, several nodes (c10d rendezvous), or Slurm (srun).

`aligntok <stage>` calls `launch_command` before doing any work. It returns None when this process should run the
stage itself (one process, or already a torchrun worker), else the command line to exec instead. Everything that
can be checked before starting N processes is checked here, so a bad setting is one line, not N tracebacks.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import warnings

from aligntok.config import ConfigError, LauncherConfig

DEFAULT_PORT = 29500


class GpuUnavailable(RuntimeError):
    """nvidia-smi lists GPUs but torch sees none: the wheel's CUDA build does not fit this node's driver."""


def _slurm_nodes(env: dict[str, str]) -> int:
    return int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)


def slurm_endpoint(env: dict[str, str]) -> str:
    """The first host of the Slurm allocation, at MASTER_PORT (or 29500): node 0 of the rendezvous."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError("launcher: SLURM_JOB_NODELIST is not set; run inside an sbatch/salloc allocation")
    try:
        first = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True, timeout=30).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        first = nodelist.split(",")[0]
        if "[" in first:  # e.g. gpu[01-04]: without scontrol, take the first number of the range
            prefix, rest = first.split("[", 1)
            first = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return f"{first}:{env.get('MASTER_PORT', DEFAULT_PORT)}"


def launch_command(launcher: LauncherConfig, argv: list[str], env: dict[str, str] | None = None) -> list[str] | None:
    env = dict(os.environ if env is None else env)
    if "LOCAL_RANK" in env:  # already a torchrun worker
        return None
    if launcher.device != "cpu":
        check_cuda_visible()
    _check_device(launcher)
    in_slurm = "SLURM_JOB_ID" in env and _slurm_nodes(env) > 1 and "ALIGNTOK_SRUN_STEP" not in env
    nnodes = _slurm_nodes(env) if in_slurm else launcher.nnodes
    if nnodes == 1 and launcher.nproc_per_node == 1:
        return None
    torchrun = [shutil.which("torchrun") or "torchrun", f"--nproc_per_node={launcher.nproc_per_node}"]
    if nnodes == 1:
        torchrun.append("--standalone")
    else:
        endpoint = slurm_endpoint(env) if in_slurm else launcher.rdzv_endpoint
        if not endpoint:
            raise ConfigError(f"launcher.rdzv_endpoint: given null with launcher.nnodes={nnodes}; expected host:port "
                              "of node 0, reachable from every node (e.g. gpu-node-0:29500)")
        rdzv_id = env["SLURM_JOB_ID"] if in_slurm else launcher.rdzv_id
        torchrun += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
                     f"--rdzv_id={rdzv_id}"]
    cmd = [*torchrun, "-m", "aligntok.cli", *argv]
    if in_slurm:  # one torchrun per node; ALIGNTOK_SRUN_STEP stops the step from launching itself again
        cpus = env.get("SLURM_CPUS_PER_TASK") or env.get("SLURM_CPUS_ON_NODE")
        # since Slurm 22.05 a step does not inherit the job's --cpus-per-task: without it, each node's torchrun
        # and all of its ranks and loader workers would be pinned to one CPU
        cmd = ["srun", f"--nodes={nnodes}", "--ntasks-per-node=1", *([f"--cpus-per-task={cpus}"] if cpus else []),
               "--kill-on-bad-exit=1", "--export=ALL,ALIGNTOK_SRUN_STEP=1", *cmd]
    return cmd


def nvidia_driver() -> str | None:
    """The driver version nvidia-smi reports, or None without nvidia-smi (or when it fails)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def check_cuda_visible() -> None:
    """Raise GpuUnavailable when nvidia-smi lists GPUs that torch cannot use, instead of running on the CPU."""
    import torch
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return
    with warnings.catch_warnings():  # torch's own "driver too old" warning: the line below says it, once
        warnings.simplefilter("ignore")
        if torch.cuda.is_available():
            return
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return
    driver = nvidia_driver()
    gpus = [line for line in listed.splitlines() if line.startswith("GPU ")]
    if gpus:
        raise GpuUnavailable(
            f"nvidia-smi lists {len(gpus)} GPU(s) (driver {driver or 'unknown'}) but torch "
            f"{torch.__version__} (CUDA {torch.version.cuda or 'none'}) sees none; install the torch build for "
            "this driver, e.g. `make install CUDA=cu126` (README: Many GPUs and nodes), or set launcher.device=cpu")


def _check_device(launcher: LauncherConfig) -> None:
    if launcher.device != "cuda":
        return
    import torch
    if not torch.cuda.is_available():
        raise ConfigError("launcher.device: given 'cuda' but this machine has no CUDA device; "
                          "expected 'auto' or 'cpu' here")
    if launcher.nproc_per_node > torch.cuda.device_count():
        raise ConfigError(f"launcher.nproc_per_node: given {launcher.nproc_per_node}; this node has "
                          f"{torch.cuda.device_count()} CUDA device(s)")
