"""A full disk under a real stage process: a data shard, a latent shard, a metrics file, a checkpoint.

The folder a stage writes to is a size-limited tmpfs in a private mount namespace (`unshare -rm`: no root
needed where user namespaces are allowed), so the write fails with the kernel's own ENOSPC inside pyarrow,
safetensors or Python. Each case checks: exit code 1 (not a bad input: free space and rerun), one line naming the
file, the files written before the fault intact and no temp file left beside them, and where it applies, that the
rerun after space is freed reuses what was written and finishes.
"""
import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_pipeline import ci_copy, sh

pytestmark = pytest.mark.slow  # ~2 min on 2 cores: eight stage processes
PAGE = 4096


def _namespaces_work(tmp: Path) -> bool:
    probe = tmp / "probe"
    probe.mkdir()
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=8k tmpfs {probe}"],
                          capture_output=True)
    return proc.returncode == 0


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A ci-profile repo with data prepared, the judge, a random-init 3rd-stage tokenizer and a finished latent
    cache."""
    from aligntok.config import load_params
    from aligntok.models.tokenizer import AlignTokenizer
    from aligntok.stages.tokenizer import tokenizer_config

    base = tmp_path_factory.mktemp("full")
    if shutil.which("unshare") is None or not _namespaces_work(base):
        pytest.skip("needs `unshare -rm` (user and mount namespaces) to make a size-limited tmpfs without root")
    repo, env = ci_copy(base, OMP_NUM_THREADS="1")
    for stage in ("prepare", "judge"):  # train-dit's probe (ci profile: every 10 steps) scores with the judge
        sh([sys.executable, "-m", "aligntok.cli", stage], repo, env)
    params = load_params(repo / "params.yaml", check_paths=False)
    torch.manual_seed(0)
    AlignTokenizer(tokenizer_config(params)).save_pretrained(repo / "outputs/tokenizer/stage3/model")
    sh([sys.executable, "-m", "aligntok.cli", "cache-latents"], repo, env)
    return repo, env


@pytest.fixture
def repo(cached, tmp_path):
    """This test's own copy of the cached repo (hard links would let a write through one copy reach another)."""
    src, env = cached
    dst = tmp_path / "repo"
    shutil.copytree(src, dst, symlinks=True)
    return dst, env


def on_small_disk(repo: Path, env: dict, folder: str, size_kb: int, phases: list[str], out: Path) -> list[dict]:
    """Run shell `phases` in `repo`, in a private mount namespace where `folder` (relative to repo) is a tmpfs of
    `size_kb` KiB, seeded with what the folder held. A phase `resize <kb>` grows the tmpfs (space freed); a
    phase `fill` fills it (another writer took the rest). After each phase the folder's contents are copied to
    out/<i> (the tmpfs goes with the namespace). Returns each phase's rc, stdout and stderr."""
    seed = out / "seed"
    target = repo / folder
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(target, seed, symlinks=True)
    lines = ["set -u", f"mount -t tmpfs -o size={size_kb}k tmpfs '{target}'", f"cp -a '{seed}/.' '{target}/'",
             f"cd '{repo}'"]
    for i, phase in enumerate(phases):
        if phase.startswith("resize "):
            cmd = f"mount -o remount,size={phase.split()[1]}k '{target}'"
        elif phase == "fill":
            cmd = f"dd if=/dev/zero of='{target}/.filler' bs={PAGE} 2>/dev/null; test -s '{target}/.filler'"
        else:
            cmd = phase
        lines += [f"( {cmd} ) > '{out}/{i}.out' 2> '{out}/{i}.err'; echo $? > '{out}/{i}.rc'",
                  f"mkdir '{out}/{i}'; cp -a '{target}/.' '{out}/{i}/'"]
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", "\n".join(lines)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [{"rc": int((out / f"{i}.rc").read_text()), "out": (out / f"{i}.out").read_text(),
             "err": (out / f"{i}.err").read_text()} for i in range(len(phases))]


def one_line(result: dict, *needles: str) -> str:
    """The failed phase's single `aligntok:` line (exit code 1: a failed write, worth a rerun once space is free)."""
    err = result["err"]
    assert result["rc"] == 1, (result["rc"], err[-2000:])
    assert "Traceback" not in err + result["out"], err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("aligntok:")]
    assert len(lines) == 1, err[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def cli(*args: str) -> str:
    return " ".join([sys.executable, "-m", "aligntok.cli", *args])


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp"))


def test_latent_shard_write_on_a_full_disk(repo, tmp_path):
    """cache-latents with 1-row shards into a work folder that holds only some of them: the first shard that does
    not fit stops the stage in one line; the previous good cache in outputs/latents and every shard written
    before are intact; once space is freed the rerun reuses exactly those shards."""
    repo, env = repo
    before = digests(repo / "outputs/latents")
    count = json.loads((repo / "outputs/latents/manifest.json").read_text())["count"]
    shutil.rmtree(repo / "checkpoints/cache-latents")  # the fixture's shards: this run starts with none
    small = ["-S", "latents.shard_rows=1", "-S", "latents.batch_size=1"]  # one shard (~1 page) per image
    kept = tmp_path / "latents-after-fault"
    res = on_small_disk(repo, env, "checkpoints/cache-latents", 64,
                        [cli("cache-latents", *small), f"cp -a outputs/latents '{kept}'", "resize 65536",
                         cli("cache-latents", *small)], tmp_path)
    line = one_line(res[0], "disk full", "checkpoints/cache-latents/", ".safetensors")
    failed = Path(line.split(": ")[2])  # aligntok: cache-latents: <path>: could not be written (...)
    after = tmp_path / "0" / failed.parent.name
    written = sorted(p.name for p in after.glob("latents-*.safetensors"))
    assert written and failed.name not in written and not temp_files(tmp_path / "0")
    from aligntok.stages.latents import _shard_done
    for k, name in enumerate(written):  # every shard left behind is complete: a reader may trust it
        assert _shard_done(after / name, after.name.split("-")[0], [k]), name
    assert digests(kept) == before  # the previous good cache was never touched

    assert res[3]["rc"] == 0, res[3]["err"][-2000:]
    assert f"reused {len(written)} of {count} finished shards" in res[3]["out"]
    assert json.loads((repo / "outputs/latents/manifest.json").read_text())["count"] == count


def test_data_shard_write_on_a_full_disk(repo, tmp_path):
    """prepare into a shard folder with room for its first shard only: the second stops it in one line naming
    that shard; no temp file, no manifest over a partial set; after freeing space the rerun keeps the first
    shard and ends with the same data set."""
    repo, env = repo
    manifest = json.loads((repo / "data/synthetic/manifest.json").read_text())
    first = repo / "checkpoints/prepare/synthetic" / manifest["shards"]["train"][0]["file"]
    room = (math.ceil(first.stat().st_size / PAGE) + 2) * PAGE // 1024 + 16  # one shard, its sidecar, a little
    shutil.rmtree(repo / "checkpoints/prepare")  # a fresh build: nothing to reuse yet
    res = on_small_disk(repo, env, "checkpoints/prepare", room,
                        [cli("prepare"), "test ! -e data/synthetic/manifest.json", "resize 65536", cli("prepare")],
                        tmp_path)
    one_line(res[0], "disk full", "checkpoints/prepare/synthetic/", ".parquet")
    left = tmp_path / "0" / "synthetic"
    assert sorted(p.name for p in left.glob("*.parquet")) == [first.name] and not temp_files(left)
    assert res[1]["rc"] == 0  # no manifest over a half-built data set: readers refuse it

    assert res[3]["rc"] == 0, res[3]["err"][-2000:]
    n = len(manifest["shards"]["train"]) + len(manifest["shards"]["val"])
    assert f"prepare: 1/{n} shards already done" in res[3]["out"]
    again = json.loads((repo / "data/synthetic/manifest.json").read_text())
    assert again["content_hash"] == manifest["content_hash"]


def test_metrics_write_on_a_full_disk(repo, tmp_path):
    """The metrics folder is full when cache-latents (every shard reused) writes its metrics: one line naming the
    file, the previous metrics file byte-identical, no temp file beside it."""
    repo, env = repo
    before = digests(repo / "outputs/metrics")
    res = on_small_disk(repo, env, "outputs/metrics", 64, ["fill", cli("cache-latents")], tmp_path)
    assert res[0]["rc"] == 0, res[0]["err"]
    one_line(res[1], "disk full", "outputs/metrics/cache-latents.json", "previous version is intact")
    left = tmp_path / "1"
    assert {k: v for k, v in digests(left).items() if k != ".filler"} == before
    assert not temp_files(left)


def test_checkpoint_write_on_a_full_disk(repo, tmp_path):
    """train-dit's first checkpoint does not fit: safetensors' own ENOSPC becomes one line naming the checkpoint
    folder, and no half-written checkpoint is left for a resume to pick up."""
    repo, env = repo
    res = on_small_disk(repo, env, "checkpoints/train-dit", 256, [cli("train-dit")], tmp_path)
    one_line(res[0], "disk full", "checkpoints/train-dit", "step-10 checkpoint")
    assert not list((tmp_path / "0").glob("step-*")) and not list((tmp_path / "0").glob(".tmp-step-*"))
