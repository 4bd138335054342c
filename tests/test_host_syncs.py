"""Host syncs per training step (issue 21, item 12): the counter of `aligntok bench sync`, the loop reading the device
once per log step and never between, a non-finite loss still caught before any checkpoint, and the real recipes
under a bound."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from aligntok.bench.sync import PACKAGE, SYNCING, Stepped, SyncCounter
from aligntok.config import TrainConfig
from aligntok.train.checkpoint import find_checkpoint
from aligntok.train.dist import DistInfo
from aligntok.train.loop import TrainingDiverged, train
from tests.conftest import ROOT
from tests.test_pipeline import isolated_env

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
HERE = Path(__file__).resolve().parent
DATA = torch.utils.data.TensorDataset(torch.randn(16, 3, 4, 4), torch.zeros(16, dtype=torch.long))


class DeviceLogs:
    """A conv net whose losses and logs are all tensors, as the project's recipes return them; NaN from `nan_at`."""

    def __init__(self, nan_at: int | None = None):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = nn.Conv2d(3, 3, 3, padding=1)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=1e-2)
        self.nan_at = nan_at

    def modules(self):
        return {"net": self.net}

    def ema_modules(self):
        return {"net": self.net}

    def optimizers(self):
        return {"main": self.opt}

    def wrap(self, fn):
        self.net = fn(self.net)

    def losses(self, batch, step):
        x = batch[0]
        loss = (self.net(x) - x.flip(-1)).pow(2).mean()
        if self.nan_at is not None and step >= self.nan_at:
            loss = loss * float("nan")
        return {"main": loss}, {"loss": loss.detach(), "abs_mean": x.abs().mean(), "host": 0.5}

    def preview(self, batch, step):
        return None


def run(tmp_path, recipe, **kw):
    cfg = TrainConfig(**{**dict(steps=8, batch_size=4, log_every=4, ckpt_every=100, image_every=100, grad_accum=2,
                                grad_clip=1.0, ema_decay=0.9), **kw})
    return train(recipe, DATA, cfg, dist=CPU, ckpt_dir=tmp_path / "ckpt", config_hash="h", seed=0, hflip=True)


def test_the_counter_sees_reads_from_counted_code_only_and_puts_torch_back():
    before = {name: torch.Tensor.__dict__.get(name) for name in SYNCING}
    t = torch.tensor(2.5)
    with SyncCounter(roots=(HERE,)) as counter:
        counter.step = 7
        float(t), t.item(), bool(t), t.tolist(), f"{t:.2f}", t.cpu()
        p = nn.Parameter(torch.ones(2))
        p.grad = torch.ones(2)
        # torch's own reads are not counted: this one checks the norm with `if` inside torch
        nn.utils.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    assert [s for s, _ in counter.events] == [7] * 6
    assert {site.split(":")[0] for _, site in counter.events} == {"tests/test_host_syncs.py"}
    assert {name: torch.Tensor.__dict__.get(name) for name in SYNCING} == before
    assert float(t) == 2.5  # and the methods still work


def test_the_loop_reads_the_device_once_per_log_step_and_never_between(tmp_path):
    # 8 steps, logs every 4 (and the final checkpoint): 2 micro-batches a step, clipping, EMA, flips. Everything
    # the loop and the recipe touch is counted, this file included
    with SyncCounter(roots=(PACKAGE, HERE)) as counter:
        out = run(tmp_path, Stepped(DeviceLogs(), counter))
    per_step = {s: [site for step, site in counter.events if step == s] for s in range(8)}
    assert all(per_step[s] == [] for s in (0, 1, 2, 4, 5, 6)), per_step
    for s in (3, 7):
        assert len(per_step[s]) == 1 and per_step[s][0].startswith("aligntok/train/window.py:"), per_step
    # the window's means are the per-step values averaged: 'host' is 0.5 at every step; the clip flags are 0 or 1
    assert [r["step"] for r in out["history"]] == [4, 8]
    assert all(r["host"] == 0.5 and r["clip_frac_main"] in (0.0, 0.25, 0.5, 0.75, 1.0) for r in out["history"])
    assert all(math.isfinite(r["loss"]) and r["grad_norm_main"] > 0 for r in out["history"])


def test_a_nan_between_reads_is_caught_at_the_next_checkpoint_before_it_is_written(tmp_path):
    # NaN from step 4 (a step that neither logs nor checkpoints); checkpoints every 3: step 6's read finds it, and
    # the message names step 4, the first non-finite loss, not the step it was read at
    with pytest.raises(TrainingDiverged, match=r"^loss 'main' is nan at step 4; stopped. Last good checkpoint "
                                               r"kept: .*step-00000003$"):
        run(tmp_path, DeviceLogs(nan_at=4), ckpt_every=3)
    assert find_checkpoint(tmp_path / "ckpt", "h").step == 3


def test_a_nan_is_caught_at_most_log_every_minus_one_steps_late(tmp_path):
    # no checkpoint before the end: the log read at step 8 (index 7) is the first to see step 4's NaN
    seen = []

    class Watch(DeviceLogs):
        def losses(self, batch, step):
            seen.append(step)
            return super().losses(batch, step)

    with pytest.raises(TrainingDiverged, match=r"^loss 'main' is nan at step 4; stopped. Last good checkpoint "
                                               r"kept: none yet$"):
        run(tmp_path, Watch(nan_at=4), steps=12)
    assert max(seen) == 7


@pytest.mark.slow
def test_the_real_recipes_read_nothing_in_the_loop_or_stages_between_log_steps():
    """`aligntok bench sync --quick` in-process: the DiT and tokenizer stage-2 recipes in the real loop. Nothing
    (the loop, the EMA, the clipping, the recipes, the loss modules) reads the device on a plain step, and the log
    window reads it once on a log step."""
    from aligntok.bench.sync import run as bench

    out = bench(quick=True)
    for name in ("dit", "tokenizer_stage2"):
        r = out[name]
        assert r["per_plain_step"] == 0 and not r["sites_plain"], r
        window = {k: v for k, v in r["sites_logged"].items() if k.startswith("aligntok/train/")}
        assert list(window.values()) == [r["logged_steps"]] and next(iter(window)).startswith(
            "aligntok/train/window.py:"), r["sites_logged"]


RANKS = """
import sys
from pathlib import Path
from aligntok.config import TrainConfig
from aligntok.train.dist import cleanup, init_distributed
from aligntok.train.loop import TrainingDiverged, train

out = Path(sys.argv[1])
dist = init_distributed("cpu")
from tests.test_host_syncs import DATA, DeviceLogs  # after joining: the tests' conftest clears torchrun's variables

class OneRankNan(DeviceLogs):
    def losses(self, batch, step):
        losses, logs = super().losses(batch, step)
        if dist.rank == 1 and step == 5:  # rank 1 alone, at a step that neither logs nor checkpoints
            losses = {"main": losses["main"] * float("nan")}
        return losses, logs

cfg = TrainConfig(steps=12, batch_size=4, log_every=4, ckpt_every=3, image_every=100, grad_clip=1.0)
try:
    train(OneRankNan(), DATA, cfg, dist=dist, ckpt_dir=out / "ckpt", config_hash="h", seed=0)
except TrainingDiverged as e:
    (out / f"rank{dist.rank}.txt").write_text(str(e))
cleanup()
"""


@pytest.mark.slow
def test_every_rank_stops_at_the_same_read_when_one_rank_diverges(tmp_path):
    """Two gloo ranks; rank 1's loss is NaN at step 5 only. The read at step 6 (a checkpoint step) all-reduces the
    count of non-finite losses, so both ranks stop there: rank 1 names its loss, rank 0 (whose own losses were all
    finite: step 5's NaN gradients reach its weights after its step-5 loss) says another rank diverged; the step-6
    checkpoint is never written."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    env = dict(isolated_env(tmp_path), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = "; stopped. Last good checkpoint kept: " + str(tmp_path / "ckpt" / "step-00000003")
    assert (tmp_path / "rank1.txt").read_text() == "loss 'main' is nan at step 5" + last
    assert (tmp_path / "rank0.txt").read_text() == "a loss on another rank is not finite by step 5" + last
    assert find_checkpoint(tmp_path / "ckpt", "h").step == 3
    assert not os.path.exists(tmp_path / "ckpt" / "step-00000006")
