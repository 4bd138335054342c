"""DDP with real processes (torchrun, gloo on CPU): per-rank randomness across a resume, one failing rank ends the
job, two "nodes" joined by a c10d rendezvous on 127.0.0.1 run a real stage, and ranks that do not share
checkpoints/ are stopped at once with one line."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_pipeline import ci_copy, sh

pytestmark = pytest.mark.slow

DRIVER = """
import json, os, sys, torch
from pathlib import Path
from aligntok.train.dist import init_distributed, cleanup
from aligntok.train.checkpoint import find_checkpoint
from aligntok.train.loop import train
from tests.test_train_loop import Toy, ToyRecipe, cfg

mode, out = sys.argv[1], Path(sys.argv[2])
dist = init_distributed("cpu")

class Recorder(ToyRecipe):
    def losses(self, batch, step):
        if mode == "raise" and dist.rank == 1 and step == 3:
            raise RuntimeError("rank 1 failed on purpose at step 3")
        noise = torch.randn(4)  # what a DiT draws for noise/timesteps/label drops
        with open(out / f"noise-r{dist.rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "noise": noise.tolist()}) + "\\n")
        return super().losses(batch, step)

ckpt = out / "ckpt"
stop = 6 if mode == "stop" else None
try:
    train(Recorder(), Toy(), cfg(steps=12, ckpt_every=4), dist=dist, ckpt_dir=ckpt, config_hash="h", seed=3,
          resume=find_checkpoint(ckpt, "h"), stop_after=stop)
except KeyboardInterrupt:
    pass
cleanup()
"""


def _torchrun(tmp_path: Path, mode: str, out: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), mode, str(out)], env=env, capture_output=True, text=True, timeout=timeout)


def _noise(out: Path, rank: int) -> dict[int, list[float]]:
    rows = [json.loads(line) for line in (out / f"noise-r{rank}.jsonl").read_text().splitlines()]
    return {r["step"]: r["noise"] for r in rows}  # a resumed step overwrites the interrupted run's draw


def test_ranks_draw_different_noise_and_a_resume_draws_the_same(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert _torchrun(tmp_path, "run", full).returncode == 0
    proc = _torchrun(tmp_path, "stop", part)  # stops after step 6 (checkpoint at 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _torchrun(tmp_path, "run", part)  # resumes at step 4 on both ranks
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        # same process layout, same step: the draw is bit-identical by construction
        assert _noise(part, rank) == _noise(full, rank)
    r0, r1 = _noise(part, 0), _noise(part, 1)
    assert sorted(r0) == list(range(12))
    assert all(r0[s] != r1[s] for s in range(12))  # after the resume too (steps 4..11)


def test_one_rank_raising_ends_every_rank_with_its_message(tmp_path):
    # a hang (rank 0 waiting forever in a collective) raises TimeoutExpired here: no wall-clock bound needed,
    # which would depend on how loaded the machine is
    proc = _torchrun(tmp_path, "raise", tmp_path / "raise", timeout=180)
    assert proc.returncode != 0
    assert "rank 1 failed on purpose at step 3" in proc.stdout + proc.stderr


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("nodes")
    repo, env = ci_copy(base, OMP_NUM_THREADS="1")
    sh([sys.executable, "-m", "aligntok.cli", "prepare"], repo, env)
    return repo, env


def _two_nodes(cwds: list[Path], env: dict, *extra: str) -> list[subprocess.CompletedProcess]:
    port = _port()
    cmd = [sys.executable, "-m", "aligntok.cli", "tokenizer-stage1", "-S", "launcher.nnodes=2",
           "-S", f"launcher.rdzv_endpoint=127.0.0.1:{port}", "-S", f"launcher.rdzv_id=test-{port}",
           "-S", "launcher.device=cpu", "-S", "tokenizer.stage1.steps=4", "-S", "tokenizer.stage1.ckpt_every=2",
           *extra]
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cwd in cwds]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=420)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        outs.append(subprocess.CompletedProcess(cmd, p.returncode, out, ""))
    return outs


def test_two_nodes_through_a_c10d_rendezvous_run_a_stage(prepared):
    repo, env = prepared
    outs = _two_nodes([repo, repo], env)
    for o in outs:
        assert o.returncode == 0, o.stdout[-3000:]
    assert (repo / "outputs/tokenizer/stage1/model/model.safetensors").exists()
    assert (repo / "checkpoints/tokenizer-stage1/latest").read_text().strip() == "step-00000004"
    metrics = json.loads((repo / "outputs/metrics/tokenizer-stage1.json").read_text())
    assert metrics["steps"] == 4


def test_nodes_without_a_shared_folder_stop_at_once_with_one_line(prepared, tmp_path):
    repo, env = prepared
    other = tmp_path / "node1"  # a second "node" whose checkpoints/ is a different folder
    shutil_copy = __import__("shutil").copytree
    shutil_copy(repo, other, ignore=lambda d, names: [n for n in names if n in ("checkpoints", "outputs", ".git")])
    outs = _two_nodes([repo, other], env)
    assert all(o.returncode != 0 for o in outs)
    text = "\n".join(o.stdout for o in outs)
    assert "cannot see rank 0's files" in text and "shared by every node" in text, text[-3000:]
