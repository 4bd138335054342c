"""The training loop's log window: each step's logs and losses stay on the device until the loop reads them.

Reading a CUDA value on the host (`float(t)`, `t.item()`, `if t:`) waits for every kernel queued before it, so a
read per logged value per step stalls the GPU several times a step. The window keeps a step's logs as 0-d device
tensors (host floats stay floats) and its losses as tensors, and reads everything it holds in one transfer: the log
means at a log step, the losses' finiteness at every step that writes or shows the weights (log, checkpoint,
preview, probe).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aligntok.train.dist import all_reduce_mean

Value = torch.Tensor | float


def accumulate(acc: dict[str, Value], logs: dict[str, Value], parts: int) -> None:
    """acc[k] += logs[k] / parts, without reading a tensor: a step's logs, averaged over its micro-batches. Tensors
    are added in float64, as the host floats they replace were."""
    for k, v in logs.items():
        if isinstance(v, torch.Tensor):
            v = v.detach()
            if parts > 1:
                v = v.double() / parts
        elif parts > 1:
            v = v / parts
        acc[k] = acc[k] + v if k in acc else v


@dataclass
class Divergence:
    """The first non-finite loss this rank saw (step, name, value), or None when another rank saw it."""
    step: int
    name: str | None = None
    value: float | None = None


class LogWindow:
    def __init__(self, device: torch.device):
        self.device = device
        self.logs: dict[str, list[Value]] = {}
        self.losses: list[tuple[int, str, torch.Tensor]] = []

    def add_losses(self, step: int, losses: dict[str, torch.Tensor | None]) -> None:
        self.losses += [(step, name, v.detach()) for name, v in losses.items() if v is not None]

    def add_logs(self, logs: dict[str, Value]) -> None:
        for k, v in logs.items():
            self.logs.setdefault(k, []).append(v)

    def read(self, step: int, with_logs: bool) -> tuple[dict[str, float], Divergence | None]:
        """One device->host transfer: the means of the window's logs over its steps, averaged over ranks (when
        `with_logs`; the window then starts afresh), and whether any rank's losses since the last read were
        non-finite. Every rank calls it at the same steps (it all-reduces)."""
        keys = list(self.logs) if with_logs else []
        head = [self._mean(self.logs[k]) for k in keys]
        losses = (torch.stack([v.to(self.device, torch.float64).reshape(()) for _, _, v in self.losses])
                  if self.losses else torch.zeros(0, dtype=torch.float64, device=self.device))
        head.append((~torch.isfinite(losses)).sum().to(torch.float64))
        values = torch.cat([all_reduce_mean(torch.stack(head)), losses]).tolist()  # the one sync
        row, bad_anywhere, mine = dict(zip(keys, values)), values[len(keys)] > 0, values[len(keys) + 1:]
        found = next((Divergence(s, name, v) for (s, name, _), v in zip(self.losses, mine) if not math.isfinite(v)),
                     Divergence(step) if bad_anywhere else None)
        self.losses = []
        if with_logs:
            self.logs = {}
        return row, found

    def _mean(self, values: list[Value]) -> torch.Tensor:
        tensors = [v.to(self.device, torch.float64).reshape(()) for v in values if isinstance(v, torch.Tensor)]
        host = sum(v for v in values if not isinstance(v, torch.Tensor))
        total = torch.stack(tensors).sum() + host if tensors else torch.full((), host, dtype=torch.float64,
                                                                             device=self.device)
        return total / len(values)
