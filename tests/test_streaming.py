"""Streaming image reader: bounded row groups in memory, exact epochs across ranks x workers, exact resume."""
import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import aligntok.data.reader as reader_module
from aligntok.data.dataset import ShardDataset, ShardIterable
from aligntok.data.order import WINDOW_GROUPS, epoch_permutation
from aligntok.data.shards import SCHEMA, DataError
from aligntok.data.sources import prepare_dataset
from aligntok.io import write_json_atomic
from aligntok.train.loop import StepBatches

N, ROWS = 96, 8  # 96 train images in 12 row groups of 8, over 3 shards


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream")
    prepare_dataset("synthetic", out, root=None, resolution=16, num_images=N, num_classes=10, val_fraction=0.0,
                    shard_rows=32, seed=0, row_group_rows=ROWS)
    return out


def fingerprint(x: torch.Tensor) -> str:
    return hashlib.sha1(x.numpy().tobytes()).hexdigest()


def _collate_with_counters(items):
    info = torch.utils.data.get_worker_info()
    return torch.stack([x for x, _ in items]), dict(info.dataset.counters), info.id


def test_every_sample_once_per_epoch_across_two_ranks_and_two_workers(data):
    ds = ShardDataset(data, "train")
    ids = {fingerprint(ds[i][0]): i for i in range(len(ds))}
    assert len(ids) == N  # synthetic images are all distinct, so an image identifies its index
    batch, epochs = 8, 2
    steps = epochs * N // batch
    seen = []
    for rank in range(2):
        sampler = StepBatches(N, batch, steps, 0, seed=3, rank=rank, world=2, group_sizes=ds.row_group_sizes)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=2,
                                             collate_fn=_collate_with_counters)
        for step, (x, counters, worker) in enumerate(loader):
            assert worker == step % 2  # batches really alternate between the two worker processes
            assert counters["peak_cached"] <= 4 and counters["peak_open"] <= 8
            seen.append([(step, ids[fingerprint(img)]) for img in x])
    flat = sorted(p for part in seen for p in part)
    for e in range(epochs):
        epoch = [i for step, i in flat if e * N // batch <= step < (e + 1) * N // batch]
        assert sorted(epoch) == list(range(N)), f"epoch {e} is not a permutation"


def test_resume_at_any_step_gives_identical_batches(data):
    ds = ShardDataset(data, "train")
    steps = 30  # > 2 epochs of 96 at batch 8

    def batches(start):
        sampler = StepBatches(N, 8, steps, start, seed=5, rank=1, world=2, group_sizes=ds.row_group_sizes)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=0)
        return [x for x, _ in loader]

    full = batches(0)
    for start in (7, 13, 25):  # mid-epoch, epoch 1, epoch 2
        resumed = batches(start)
        assert len(resumed) == steps - start
        # bit-exact: the same PNG bytes decode to the same floats
        assert all(torch.equal(a, b) for a, b in zip(resumed, full[start:]))


def test_row_group_local_order_is_a_permutation_that_keeps_each_row_group_in_one_window():
    sizes = np.array([8] * 60 + [3, 5])  # last groups short, as at a shard's end
    n = int(sizes.sum())
    group_of = np.repeat(np.arange(len(sizes)), sizes)
    a, b = epoch_permutation(n, 1, 0, sizes), epoch_permutation(n, 1, 1, sizes)
    assert sorted(a) == list(range(n)) and not np.array_equal(a, b)
    assert np.array_equal(a, epoch_permutation(n, 1, 0, sizes))  # a pure function of (seed, epoch)
    for g in range(len(sizes)):  # a row group's rows lie within one window of positions
        where = np.flatnonzero(group_of[a] == g)
        assert where.max() - where.min() < WINDOW_GROUPS * 8
    # ... yet within a window rows are shuffled: consecutive positions rarely share a row group
    assert np.mean(group_of[a][1:] == group_of[a][:-1]) < 0.2
    full = epoch_permutation(n, 1, 0)
    assert sorted(full) == list(range(n))


def test_reader_over_many_shards_keeps_its_bound(tmp_path):
    prepare_dataset("synthetic", tmp_path, root=None, resolution=8, num_images=200, num_classes=10,
                    val_fraction=0.0, shard_rows=10, seed=0, row_group_rows=4)  # 20 shards, 60 row groups
    ds = ShardDataset(tmp_path, "train")
    reader = ds.reader
    assert reader.num_row_groups == 60 and len(reader.paths) == 20
    for i in range(len(ds)):  # sequential pass: each row group read once
        ds[i]
    c = ds.counters
    assert c["reads"] == 60 and c["peak_cached"] == 4 and c["peak_open"] <= 8 and c["opens"] == 20
    rng = np.random.default_rng(0)
    for _ in range(50):  # random batches: at most one read per distinct row group in the batch
        idx = rng.integers(0, len(ds), 16).tolist()
        before = c["reads"]
        ds.__getitems__(idx)
        assert c["reads"] - before <= len({reader.locate(i)[0] for i in idx})
    assert c["peak_cached"] == 4 and c["peak_open"] == 8
    biggest = max(reader.group(g).nbytes for g in range(reader.num_row_groups))
    assert c["peak_cached_bytes"] <= 4 * biggest
    it = ShardIterable(tmp_path, "train")
    assert sorted(i for i, _, _ in it) == list(range(200))
    assert it.base.counters["peak_cached"] == 1  # in-order iteration: one row group at a time


def _old_layout(folder, rows=40):
    """A shard as the previous prepare wrote it: one row group, and a manifest without row_group_rows."""
    from aligntok.data.images import encode_png
    from aligntok.data.synthetic import synthetic_image
    table = pa.Table.from_pylist([{"key": f"k{i}", "image": encode_png(synthetic_image(i, i % 3, 16, 0)),
                                   "label": i % 3, "class_name": "c"} for i in range(rows)], schema=SCHEMA)
    pq.write_table(table, folder / "train-00000.parquet", compression="none")
    write_json_atomic(folder / "manifest.json", {
        "version": 1, "resolution": 16, "num_classes": 3, "class_names": ["a", "b", "c"], "content_hash": "x",
        "counts": {"train": {}, "val": {}},
        "shards": {"train": [{"file": "train-00000.parquet", "rows": rows}], "val": []}})


def test_old_layout_shard_is_read_when_small_and_refused_in_one_line_when_large(tmp_path, monkeypatch):
    _old_layout(tmp_path)
    ds = ShardDataset(tmp_path, "train")
    assert ds.row_group_sizes.tolist() == [40] and ds.labels[:4] == [0, 1, 2, 0]
    assert ds[5][0].shape == (3, 16, 16)
    monkeypatch.setattr(reader_module, "MAX_ROW_GROUP_BYTES", 4096)  # as if the row group were ~500 MB
    with pytest.raises(DataError) as err:
        ShardDataset(tmp_path, "train")
    msg = str(err.value)
    assert "\n" not in msg and "train-00000.parquet: row group 0 holds 40 rows" in msg
    assert msg.endswith("re-run `aligntok prepare`")


def test_manifest_records_row_groups_and_shard_row_count_mismatch_is_refused(data, tmp_path):
    import json
    m = json.loads((data / "manifest.json").read_text())
    assert m["row_group_rows"] == ROWS
    pf = pq.ParquetFile(data / m["shards"]["train"][0]["file"])
    assert [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)] == [ROWS] * 4
    m["shards"]["train"][0]["rows"] += 1
    for s in m["shards"]["train"]:
        (tmp_path / s["file"]).write_bytes((data / s["file"]).read_bytes())
    write_json_atomic(tmp_path / "manifest.json", m)
    with pytest.raises(DataError, match="32 rows, manifest says 33; re-run `aligntok prepare`"):
        ShardDataset(tmp_path, "train")
