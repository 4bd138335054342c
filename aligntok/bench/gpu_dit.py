"""gpu-check's DiT rows: LightningDiT train steps (bf16 autocast, TF32, fused AdamW: what `aligntok train-dit` runs
on CUDA) per batch, eager, with `dit.grad_checkpointing`, with `dit.compile`, and one Euler sampling step.

Compiled rows use static shapes per batch: dynamo's state is reset whenever the batch changes, so each batch gets
graphs compiled for its own shape (as a training run, which keeps one batch, does) instead of a dynamic-shape
recompile. The compile happens in the untimed warm-up; graphs compiled during the timed steps are counted as
`recompiles` (0 expected)."""
from __future__ import annotations

import statistics
import time

import torch

from aligntok.bench.dit import NUM_CLASSES, SAMPLER_STEPS
from aligntok.train.loop import adamw, bf16_autocast


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, steps: int, budget_s: float) -> dict:
    """Median seconds per call of up to `steps` calls after `warmup` untimed ones; the timed calls stop early (after
    at least one) once they have taken `budget_s`. Each timed call ends with a device sync."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    stop = time.perf_counter() + budget_s
    while len(times) < steps and (not times or time.perf_counter() < stop):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"s_per_step": statistics.median(times), "timed_steps": len(times)}


def graphs_compiled() -> int:
    """Graphs torch.compile has compiled in this process so far (dynamo's counter; reset() does not clear it)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


class DitTrain:
    """One LightningDiT and its AdamW, built on first use and shared by the rows of one group (each row's peak memory
    then includes the weights and optimiser state, as training holds them); close() frees them."""

    def __init__(self, name: str, latent: tuple[int, int, int], device: torch.device):
        self.name, self.latent, self.device = name, latent, device
        self._built: tuple | None = None
        self._batch: int | None = None  # the batch the compiled graphs were made for

    def _get(self):
        if self._built is None:
            from aligntok.diffusion.flow import FlowMatching
            from aligntok.models.dit import build_dit
            torch.manual_seed(0)
            model = build_dit(self.name, input_size=self.latent[1], in_channels=self.latent[0],
                              num_classes=NUM_CLASSES).to(self.device)
            self._built = (model, adamw(model.parameters(), self.device, lr=1e-4), FlowMatching())
        return self._built

    def close(self) -> None:
        self._built, self._batch = None, None

    def train_row(self, batch: int, compiled: bool, remat: bool, warmup: int, steps: int, budget_s: float) -> dict:
        model, opt, fm = self._get()
        d = self.device
        model.train()
        model.grad_checkpointing = remat
        model.compiled = False
        if compiled:
            if batch != self._batch:  # static shapes: this batch's own graphs, never a dynamic-shape recompile
                from torch._dynamo import reset
                reset()
                self._batch = batch
            model.compile_blocks()
        x = torch.randn(batch, *self.latent, device=d)
        y = torch.randint(0, NUM_CLASSES, (batch,), device=d)

        def step():
            with bf16_autocast(d):
                loss, _ = fm.loss(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        try:
            t0, graphs = time.perf_counter(), graphs_compiled()
            for _ in range(warmup):
                step()
            sync(d)
            warm_s, warm_graphs = time.perf_counter() - t0, graphs_compiled() - graphs
            r = timed(step, d, 0, steps, budget_s)
            row = {"img_per_s": batch / r["s_per_step"], **r}
            if compiled:
                row["recompiles"] = graphs_compiled() - graphs - warm_graphs
                row["note"] = f"warm-up compiled {warm_graphs} graph(s) in {warm_s:.0f} s"
            return row
        finally:
            opt.zero_grad(set_to_none=True)
            model.compiled, model.grad_checkpointing = False, False

    def sample_row(self, batch: int, warmup: int, steps: int, budget_s: float) -> dict:
        from aligntok.diffusion.sampler import sample

        model, opt, _ = self._get()
        d = self.device
        opt.zero_grad(set_to_none=True)
        model.eval()
        x = torch.randn(batch, *self.latent, device=d)
        y = torch.randint(0, NUM_CLASSES, (batch,), device=d)

        def euler_step():
            with torch.no_grad(), bf16_autocast(d):
                sample(model, x, y, steps=1, method="euler")
        try:
            r = timed(euler_step, d, warmup, steps, budget_s)
        finally:
            model.train()
        return {"img_per_s": batch / (SAMPLER_STEPS * r["s_per_step"]), **r,
                "note": f"one Euler step timed; img/s of a {SAMPLER_STEPS}-step sampler without CFG"}
