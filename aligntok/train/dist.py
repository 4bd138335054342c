"""Process-group set-up: the same code runs as one CPU process (tests) or under torchrun on N GPUs."""
from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as torch_dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(choice: str = "auto", local_rank: int = 0) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("launcher.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class SharedDirError(RuntimeError):
    """Ranks do not see the same checkpoints/ folder (the stage needs a shared file system)."""


def init_distributed(device_choice: str = "auto", shared_dir: Path | str = "checkpoints",
                     timeout_s: float = 3600) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else run single-process.

    `timeout_s` (launcher.timeout_s) bounds every collective: ranks wait in one while rank 0 alone saves a
    checkpoint. Multi-node runs also prove at once that every rank sees rank 0's `shared_dir` (checkpoints, resume
    state and outputs are shared through the file system), instead of failing hours later at the first resume.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local)
    if world > 1 and not torch_dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                      timeout=timedelta(seconds=timeout_s))
        check_shared_dir(Path(shared_dir), rank)
    return DistInfo(rank, world, local, device)


def check_shared_dir(path: Path, rank: int, wait_s: float = 10.0) -> None:
    """Rank 0 writes a fresh token under `path`; every rank must read it back (NFS may need a moment)."""
    token = from_main(lambda: uuid.uuid4().hex)
    probe = path / ".shared-dir-check" / token
    if rank == 0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    torch_dist.barrier()
    deadline = time.monotonic() + wait_s
    while not (seen := probe.is_file() and probe.read_text() == token) and time.monotonic() < deadline:
        time.sleep(0.5)
    views = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(views, (rank, socket.gethostname(), seen))
    torch_dist.barrier()
    if rank == 0:
        probe.unlink(missing_ok=True)
    blind = [f"rank {r} on {host}" for r, host, ok in views if not ok]
    if blind:
        raise SharedDirError(f"{path.resolve()}: {', '.join(blind)} cannot see rank 0's files; checkpoints/, "
                             "outputs/ and data/ must be on a file system shared by every node")


def from_main(compute: Callable[[], T]) -> T:
    """Rank 0 runs `compute`; every rank returns rank 0's result (one process: just `compute()`)."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return compute()
    box = [compute() if torch_dist.get_rank() == 0 else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if torch_dist.is_initialized():
        t = t.clone()
        torch_dist.all_reduce(t)
        t /= torch_dist.get_world_size()
    return t


def cleanup() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
