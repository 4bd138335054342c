"""Kill and resume, as a cluster does it: SIGKILL of `dvc repro <stage>` (the whole process group) at a seeded
random moment after the stage's first checkpoint (cache-latents: its first shards), then `dvc repro <stage>` again.
The rerun resumes, says so, and the exported model (the latent cache) is bit-identical to an uninterrupted run's
(same machine, same threads: deterministic on CPU)."""
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_pipeline import ci_copy, sh

pytestmark = pytest.mark.slow

# stage -> (params section to lengthen, exported weights)
STAGES = {
    "tokenizer-stage1": ("tokenizer.stage1", "outputs/tokenizer/stage1/model/model.safetensors"),
    "tokenizer-stage2": ("tokenizer.stage2", "outputs/tokenizer/stage2/model/model.safetensors"),
    "tokenizer-stage3": ("tokenizer.stage3", "outputs/tokenizer/stage3/model/model.safetensors"),
    "train-dit": ("dit", "outputs/dit/model/model.safetensors"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A ci-profile repo whose whole DAG has run once (every stage's inputs exist)."""
    base = tmp_path_factory.mktemp("kill")
    repo, env = ci_copy(base, OMP_NUM_THREADS="1")
    sh(["dvc", "repro"], repo, env)
    return repo, env


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _lengthen(repo: Path, section: str) -> None:
    """More steps and a checkpoint every few, so a kill lands mid-training (and the params differ from any cache)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    node = params
    for key in section.split("."):
        node = node[key]
    node.update(steps=40, ckpt_every=5, log_every=5, image_every=40)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigkill_then_dvc_repro_resumes_bit_identically(built, tmp_path, stage):
    section, weights = STAGES[stage]
    src, env = built
    repo = tmp_path / "repo"
    shutil.copytree(src, repo, symlinks=True)
    _lengthen(repo, section)
    ckpt = repo / "checkpoints" / stage
    shutil.rmtree(ckpt, ignore_errors=True)

    sh([sys.executable, "-m", "aligntok.cli", stage], repo, env)  # the uninterrupted reference
    reference = _digest(repo / weights)
    shutil.rmtree(ckpt)

    proc = subprocess.Popen(["dvc", "repro", "-s", stage], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(ckpt.glob("step-*")):
        assert proc.poll() is None, "stage ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(random.Random(stage).uniform(0.0, 1.0))  # a seeded random moment after the first checkpoint
    assert proc.poll() is None, "stage finished before the kill; lengthen it"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = sorted(p.name for p in ckpt.glob("step-*"))
    assert kept and kept[-1] < "step-00000040"

    out = sh(["dvc", "repro", "-s", stage], repo, env)
    assert f"Running stage '{stage}'" in out.stdout
    assert f"aligntok: {stage}: resuming at step {int(kept[-1][5:])} of 40" in out.stdout + out.stderr
    assert _digest(repo / weights) == reference


def test_sigkill_of_cache_latents_then_dvc_repro_reuses_finished_shards(built, tmp_path):
    """cache-latents in 2-row shards (~70 of them), killed after a seeded random number of shards exist: the rerun
    reuses every shard written before the kill (same files, never rewritten), encodes the rest, and publishes
    a cache bit-identical to an uninterrupted run's."""
    src, env = built
    repo = tmp_path / "repo"
    shutil.copytree(src, repo, symlinks=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["latents"].update(shard_rows=2, batch_size=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    work = repo / "checkpoints" / "cache-latents"
    shutil.rmtree(work, ignore_errors=True)

    sh([sys.executable, "-m", "aligntok.cli", "cache-latents"], repo, env)  # the uninterrupted reference
    latents = repo / "outputs" / "latents"
    reference = {p.name: _digest(p) for p in latents.iterdir()}
    total = len([n for n in reference if n.endswith(".safetensors")])
    shutil.rmtree(work)

    proc = subprocess.Popen(["dvc", "repro", "-s", "cache-latents"], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    target = random.Random("cache-latents").randint(2, total // 3)  # a seeded random moment, in shards written
    deadline = time.monotonic() + 300
    while len(list(work.glob("*/latents-*.safetensors"))) < target:
        assert proc.poll() is None, "stage ended before the kill"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in work.glob("*/latents-*.safetensors")}
    assert target <= len(done) < total, (target, len(done), total)

    out = sh(["dvc", "repro", "-s", "cache-latents"], repo, env)
    assert f"reused {len(done)} of {total} finished shards" in out.stdout + out.stderr
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done} == done  # not rewritten
    assert not list(work.glob("*/.*.tmp"))  # the killed run's temp file is gone
    assert {p.name: _digest(p) for p in latents.iterdir()} == reference
