"""Parallel, resumable prepare: same bytes and content hash for any worker count, and after a real SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from aligntok.data.shards import DataError
from aligntok.data.sources import prepare_dataset
from tests.conftest import SMOKE


def shard_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.parquet"))}


def manifest(d):
    return json.loads((d / "manifest.json").read_text())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An image folder of 3 classes with bad files among the first items (interleaved order: a0 b0 c0 a1 ...)."""
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    for c in "abc":
        (root / c).mkdir()
        for k in range(12):
            img = Image.fromarray(rng.integers(0, 255, (30 + k, 40, 3), dtype=np.uint8))
            img.save(root / c / f"{k:02d}.{'png' if k % 2 else 'jpg'}")
    (root / "a" / "00.jpg").write_bytes(b"")             # zero-byte
    (root / "b" / "01.png").write_text("not an image")   # not an image
    (root / "c" / "03.png").write_bytes((root / "c" / "05.png").read_bytes()[:60])  # truncated
    return root


def folder_prep(out, root, workers, **kw):
    args = dict(resolution=16, num_images=None, num_classes=3, val_fraction=0.25, shard_rows=4, seed=0)
    return prepare_dataset("imagefolder", out, root=root, workers=workers, **{**args, **kw})


def test_parallel_prepare_equals_serial(tmp_path, folder):
    serial = folder_prep(tmp_path / "serial", folder, workers=1)
    parallel = folder_prep(tmp_path / "parallel", folder, workers=2)
    assert len(serial["shards"]["train"]) > 2 and len(serial["skipped"]) == 3
    assert shard_bytes(tmp_path / "serial") == shard_bytes(tmp_path / "parallel")
    assert manifest(tmp_path / "serial") == manifest(tmp_path / "parallel") == parallel == serial
    assert sorted(p.name for p in (tmp_path / "parallel").iterdir()) == sorted(
        ["manifest.json", *shard_bytes(tmp_path / "parallel")])  # no progress files left behind


def test_cap_keeps_the_first_usable_images_topping_up_skipped_ones(tmp_path, folder):
    m = folder_prep(tmp_path / "cap", folder, workers=1, num_images=10)
    assert sum(m["num_images"].values()) == 10
    assert [s["path"] for s in m["skipped"]] == ["a/00.jpg", "b/01.png", "c/03.png"]  # all within the first 13
    full = folder_prep(tmp_path / "all", folder, workers=1)
    assert m["content_hash"] != full["content_hash"]


def test_rerun_rebuilds_only_missing_or_damaged_shards(tmp_path):
    kw = dict(root=None, resolution=16, num_images=120, num_classes=5, val_fraction=0.2, shard_rows=8, seed=3)
    ref = prepare_dataset("synthetic", tmp_path / "ref", **kw)
    work, out = tmp_path / "work", tmp_path / "out"
    prepare_dataset("synthetic", out, work_dir=work, **kw)
    shards = sorted(work.glob("*.parquet"))
    (work / ".progress" / f"{shards[0].name}.json").unlink()      # killed between shard and sidecar
    shards[1].unlink()                                            # killed before the shard was published
    shards[2].write_bytes(shards[2].read_bytes()[:-10])           # damaged after the fact
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards[3:]}
    again = prepare_dataset("synthetic", out, work_dir=work, **kw)
    assert again == ref and shard_bytes(out) == shard_bytes(tmp_path / "ref")
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards[3:]} == before  # kept as they were
    assert (out / shards[3].name).stat().st_ino == shards[3].stat().st_ino  # published as hard links


def test_output_folder_as_parquet_source_is_refused(tmp_path):
    prepare_dataset("synthetic", tmp_path, root=None, resolution=8, num_images=4, num_classes=2, val_fraction=0.0,
                    shard_rows=4, seed=0)
    with pytest.raises(DataError, match="is the output folder; prepare into another folder"):
        prepare_dataset("parquet", tmp_path, root=tmp_path, resolution=8, num_images=None, num_classes=2,
                        val_fraction=0.0, shard_rows=4, seed=0)


@pytest.mark.slow
def test_killed_prepare_resumes_and_ends_with_the_same_manifest(tmp_path, isolated_mlflow):
    """SIGKILL a running `aligntok prepare` (all its processes) once shards exist, rerun, compare with one run."""
    settings = dict(num_images=1200, resolution=32, num_classes=10, val_fraction=0.1, shard_rows=16)
    overrides = ["data.num_workers=2", "seed=7", *(f"data.{k}={v}" for k, v in settings.items())]
    cmd = [sys.executable, "-m", "aligntok.cli", "prepare", "--params", str(SMOKE),
           *(a for o in overrides for a in ("-S", o))]
    progress = tmp_path / "checkpoints" / "prepare" / "synthetic" / ".progress"
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(list(progress.glob("*.json"))) < 3:
            assert proc.poll() is None, "prepare finished or failed before it could be killed"
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker processes, as an OOM kill or scancel would
        proc.wait()
    data = tmp_path / "data" / "synthetic"
    assert not (data / "manifest.json").exists()
    done = {p.name[:-len(".json")] for p in progress.glob("*.json")}
    kept = {n: (progress.parent / n).stat().st_ino for n in done}
    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{len(done)}/" in rerun.stdout  # "k/n shards already done"
    assert {n: (progress.parent / n).stat().st_ino for n in done} == kept  # finished shards were not redone
    ref = prepare_dataset("synthetic", tmp_path / "ref", root=None, seed=7, workers=1, **settings)
    assert manifest(data) == ref
    assert shard_bytes(data) == shard_bytes(tmp_path / "ref")
