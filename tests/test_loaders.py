"""The two image loaders: cache-latents decodes in loader processes and still writes the same shard files, byte
for byte, and resumes the same way; training gives each rank a contiguous slice of a global batch that is the
same for every world size, and a rank's slice reads fewer row groups than strided positions of the batch did."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import aligntok.stages.latents as latents_stage
from aligntok.bench.loader import strided, train_reads
from aligntok.data.dataset import ShardDataset
from aligntok.data.order import StepBatches
from aligntok.data.sources import prepare_dataset
from aligntok.models.tokenizer import AlignTokenizer
from aligntok.stages.latents import encode_split


def _tiny_tokenizer() -> AlignTokenizer:
    torch.manual_seed(0)
    return AlignTokenizer({"kind": "aligntok", "encoder_arch": "tf_efficientnet_lite0", "encoder_pretrained": "none",
                           "image_size": 32, "latent_channels": 4, "size": "tiny", "kl": False,
                           "adapter_hidden": 8}).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("loaders") / "data"
    # 100 images in 8-row groups and 40-row files: row groups and files end inside batches and rank slices
    prepare_dataset("synthetic", out, root=None, resolution=32, num_images=100, num_classes=4, val_fraction=0.0,
                    shard_rows=40, seed=0, row_group_rows=8)
    return out


def _encode(tok, ds, out, workers):
    out.mkdir(exist_ok=True)
    # shards of 20 rows (the last of 10) in batches of 8: loader pieces of 3 rows, so a batch is joined from 3 pieces
    # (the last one short) and pieces, batches, shards and row groups (8) all end in different places
    return encode_split(tok, ds, range(3), out, shard_rows=20, batch_size=8, hflip=True, tok_hash="h",
                        device=torch.device("cpu"), num_workers=workers, show_progress=False)


def test_cache_latents_writes_the_same_shards_with_loader_workers_and_resumes_alike(tmp_path, monkeypatch):
    monkeypatch.setattr(latents_stage, "LOAD_ROWS", 3)  # ImageNet's 32-row pieces of 256-image batches, in small
    prepare_dataset("synthetic", tmp_path / "data", root=None, resolution=32, num_images=50, num_classes=4,
                    val_fraction=0.0, shard_rows=25, seed=0, row_group_rows=8)
    ds = ShardDataset(tmp_path / "data", "train")
    tok = _tiny_tokenizer()
    runs = {w: _encode(tok, ds, tmp_path / f"w{w}", w) for w in (0, 2)}
    assert runs[0] == runs[2] and runs[0][1:] == (50, 0)

    def files(w):
        return {p.name: p.read_bytes() for p in sorted((tmp_path / f"w{w}").glob("*.safetensors"))}
    # PNG decoding and the CPU tokenizer are deterministic: the files are bit-identical, not merely close
    assert len(files(0)) == 3 and files(0) == files(2)
    shards = sorted((tmp_path / "w2").glob("*.safetensors"))
    shards[1].unlink()  # killed before shard 1 was written
    shards[2].write_bytes(shards[2].read_bytes()[:100])  # a torn file
    records, encoded, reused = _encode(tok, ds, tmp_path / "w2", 2)
    assert (records, encoded, reused) == (runs[0][0], 20 + 10, 1)
    assert files(2) == files(0)


@pytest.mark.parametrize("group_sizes", [None, "stored"])
def test_each_rank_takes_a_contiguous_slice_of_one_global_batch_for_every_world_size(data, group_sizes):
    ds = ShardDataset(data, "train")
    sizes = ds.row_group_sizes if group_sizes else None
    n, batch, steps = len(ds), 16, 25  # 4 epochs of 100 in steps of 16: steps straddle epoch ends
    one = StepBatches(n, batch, steps, 0, seed=3, group_sizes=sizes)
    for world in (2, 4, 8):
        ranks = [StepBatches(n, batch, steps, 0, seed=3, rank=r, world=world, group_sizes=sizes)
                 for r in range(world)]
        for step in range(steps):
            parts = [r.indices(step) for r in ranks]
            assert sum(parts, []) == one.indices(step) == one.global_batch(step)  # in order, not only as sets
            for r, part in enumerate(parts):  # rank r holds positions [r * B / W, (r + 1) * B / W)
                assert part == one.global_batch(step)[r * batch // world:(r + 1) * batch // world]
    # the global batch is the step's run positions, only reordered (by storage row with row groups)
    for step in range(steps):
        assert sorted(one.global_batch(step)) == sorted(one.positions(step))
        if sizes is not None:
            assert one.global_batch(step) == sorted(one.positions(step))
    flat = [i for s in range(steps) for i in one.indices(s)]
    assert sorted(flat) == sorted(list(range(n)) * 4)  # every sample once per epoch


def test_a_rank_slice_reads_fewer_row_groups_than_strided_positions(data):
    ds = ShardDataset(data, "train")
    # the bench's strided assignment is the sampler's old rule: run positions rank, rank + W, ... of the step
    s = StepBatches(len(ds), 16, 20, 0, seed=0, rank=1, world=4, group_sizes=ds.row_group_sizes)
    for step in (2, 6):  # within epoch 0; across the end of epoch 0 (positions 96..111)
        old = [int(s._order(p // len(ds))[p % len(ds)]) for p in range(step * 16 + 1, (step + 1) * 16, 4)]
        assert strided(s, step) == old
    # 100 rows in 13 row groups of <= 8; ImageNet's proportions: a global batch of one window (8 row groups, 64
    # rows), 8 ranks of 8 rows; 6 steps, so batches straddle epoch ends
    reads = train_reads(data, world=8, global_batch=64, steps=6)
    before, after = reads["strided"], reads["contiguous"]
    assert before["bytes_used"] == after["bytes_used"] > 0  # the same rows in total, only split differently
    # measured (the orders are seeded, so these are exact): strided 5.9 row groups per rank per step (at most 7),
    # contiguous 2.0 (at most 3: 8 sorted rows span 1-2 groups, 3 where a batch straddles windows)
    assert after["row_groups"] < 0.5 * before["row_groups"]
    assert after["max_row_groups"] <= 3 < before["max_row_groups"]
    assert after["bytes_read"] < 0.5 * before["bytes_read"]
    assert after["bytes_read"] >= after["bytes_used"]


@pytest.mark.slow  # prepares 600 images and starts loader processes: ~50 s on 2 busy cores
def test_bench_loader_quick_reports_both_loaders_before_and_after(tmp_path):
    out = tmp_path / "loader.json"
    proc = subprocess.run([sys.executable, "-m", "aligntok.cli", "bench", "loader", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["target"] == "loader" and '"train_reads_per_rank_step"' in proc.stdout
    workers = r["config"]["loader_workers"]
    decode = r["cache_latents_decode"]
    assert set(decode) == {"main_process_one_at_a_time_img_s", "loader_0_workers_img_s",
                           f"loader_{workers}_workers_img_s"} and all(v > 0 for v in decode.values())
    reads = r["train_reads_per_rank_step"]
    assert reads["strided"]["bytes_used"] == reads["contiguous"]["bytes_used"]
    assert r["train_row_groups_fewer_x"] == round(reads["strided"]["row_groups"] / reads["contiguous"]["row_groups"],
                                                  2) > 1
    assert np.isclose(r["cache_latents_speedup"], decode[f"loader_{workers}_workers_img_s"]
                      / decode["main_process_one_at_a_time_img_s"], atol=0.01)


def test_cache_latents_writes_latents_that_come_out_channels_last(tmp_path, data):
    """A ViT encoder's feature map (DINOv2, the paper's) comes out of its reshape channels-last; the shard writer
    refused such a tensor, so cache-latents failed on the paper profile while the CNN stand-in passed."""
    ds = ShardDataset(data, "train")
    tok = _tiny_tokenizer()
    plain = _encode(tok, ds, tmp_path / "plain", 0)
    encode = tok.encode
    tok.encode = lambda x: encode(x).contiguous(memory_format=torch.channels_last)
    assert not tok.encode(ds[0][0][None].repeat(2, 1, 1, 1)).is_contiguous()
    assert _encode(tok, ds, tmp_path / "cl", 0) == plain
    assert [p.read_bytes() for p in sorted((tmp_path / "cl").glob("*.safetensors"))] == \
        [p.read_bytes() for p in sorted((tmp_path / "plain").glob("*.safetensors"))]
