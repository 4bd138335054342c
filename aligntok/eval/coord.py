"""How evaluate's ranks agree: a gloo group with a long timeout, next to the stage's NCCL (or gloo) group.

Ranks wait for each other far longer in evaluate than in training: after a resume one rank may still have hours
of sample parts left while the others are done, and rank 0 alone scores 50K samples while the rest wait. NCCL's
default timeout is 10 minutes and every collective here moves small Python objects, so they go over gloo (CPU,
any backend, any device) with a timeout measured in hours. One process: every call is local.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as torch_dist

TIMEOUT = timedelta(hours=24)


class Coord:
    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.group = None
        if world_size > 1 and torch_dist.is_initialized():
            self.group = torch_dist.new_group(backend="gloo", timeout=TIMEOUT)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.group is not None:
            torch_dist.barrier(group=self.group)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.group is None:
            return obj
        box = [obj if self.is_main else None]
        torch_dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if self.group is None:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        torch_dist.gather_object(obj, out, dst=0, group=self.group)
        return out
