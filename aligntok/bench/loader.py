"""`aligntok bench loader`: the two image loaders, before and after, from one synthetic data set.

cache-latents: images/s of the decode path alone (no tokenizer), the way it was (each image decoded in the main
process, then stacked) and through `image_batches` with 0 and N loader processes (N = the CPUs this process may
use; process start-up included).
Training: per rank per step, the row groups read, files opened and bytes read by the streaming reader, and the
bytes the rank's rows use, when ranks take strided positions of the step's global batch (the way it was) and
when they take contiguous slices of it sorted by storage row (`StepBatches`); both from the same epoch orders.
Each step is read by a reader of its own, as a DataLoader worker reads it (its few cached row groups are those of
steps other workers did not take).
"""
from __future__ import annotations

import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aligntok.data.dataset import ShardDataset, loader_workers
from aligntok.data.order import StepBatches
from aligntok.data.reader import RowGroupReader
from aligntok.data.sources import prepare_dataset
from aligntok.stages.latents import image_batches

# ImageNet's layout in small: row groups of 32 (prepare's default), 8 ranks at global batch 256, and an image
# count that is no multiple of 256 (nor is 1,281,167), so later epochs start mid-window. Files of 4 row groups:
# a window's row groups lie in different files, as they do among ImageNet's 313 files of 128.
FULL = {"resolution": 256, "num_images": 1200, "shard_rows": 128, "world": 8, "global_batch": 256, "epochs": 3,
        "decode_images": 1024, "cache_batch": 64}
QUICK = {**FULL, "resolution": 32, "num_images": 600, "decode_images": 256}


def strided(sampler: StepBatches, step: int) -> list[int]:
    """The rank's samples of `step` as they were: every world-th position of the step, from the rank's own."""
    return sampler.positions(step)[sampler.rank::sampler.world]


def step_reads(reader: RowGroupReader, indices: list[int]) -> dict[str, int]:
    """What reading `indices` costs a reader with an empty cache, and the bytes of the rows it returns."""
    fresh = pickle.loads(pickle.dumps(reader))  # drops the cache and the open files
    fresh.counters = dict.fromkeys(fresh.counters, 0)
    used = sum(len(row["image"]) for row in fresh.rows(indices))
    return {"row_groups": fresh.counters["reads"], "opens": fresh.counters["opens"],
            "bytes_read": fresh.counters["bytes_read"], "bytes_used": used}


def train_reads(data_dir: Path, world: int, global_batch: int, steps: int, seed: int = 0) -> dict[str, dict]:
    """Mean per rank per step of `step_reads`, for strided positions and for contiguous slices."""
    ds = ShardDataset(data_dir, "train")
    out = {}
    for name, pick in (("strided", strided), ("contiguous", StepBatches.indices)):
        rows = []
        for rank in range(world):
            sampler = StepBatches(len(ds), global_batch, steps, 0, seed, rank, world, group_sizes=ds.row_group_sizes)
            rows += [step_reads(ds.reader, pick(sampler, step)) for step in range(steps)]
        out[name] = {k: round(float(np.mean([r[k] for r in rows])), 2) for k in rows[0]}
        out[name]["max_row_groups"] = max(r["row_groups"] for r in rows)
    return out


def decode_rates(data_dir: Path, num_images: int, batch: int, workers: int) -> dict[str, float]:
    """cache-latents' images/s without the tokenizer: the old per-image path, `image_batches` at 0 and N."""
    ds = ShardDataset(data_dir, "train")
    batches = [list(range(b, min(num_images, b + batch))) for b in range(0, num_images, batch)]
    cpu = torch.device("cpu")
    for path in ds.reader.paths:  # every way is timed from the page cache, none pays the first read
        path.read_bytes()
    ds[0]

    def rate(fn) -> float:
        t = time.perf_counter()
        fn()
        return round(num_images / (time.perf_counter() - t), 1)

    def one_at_a_time():
        for rows in batches:
            torch.stack([ds[i][0] for i in rows])

    def loader(n: int):
        return lambda: [None for _ in image_batches(ds, batches, n, cpu)]
    return {"main_process_one_at_a_time_img_s": rate(one_at_a_time), "loader_0_workers_img_s": rate(loader(0)),
            f"loader_{workers}_workers_img_s": rate(loader(workers))}


def run(quick: bool = False, out_dir: Path | None = None) -> dict:
    c = QUICK if quick else FULL
    workers = loader_workers(None)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        data = Path(out_dir or tmp) / "data"
        prepare_dataset("synthetic", data, root=None, resolution=c["resolution"], num_images=c["num_images"],
                        num_classes=10, val_fraction=0.0, shard_rows=c["shard_rows"], seed=0, workers=None)
        steps = c["epochs"] * c["num_images"] // c["global_batch"]
        decode = decode_rates(data, c["decode_images"], c["cache_batch"], workers)
        reads = train_reads(data, c["world"], c["global_batch"], steps)
    before, after = reads["strided"], reads["contiguous"]
    return {"config": {**c, "loader_workers": workers, "train_steps": steps},
            "cache_latents_decode": decode,
            "cache_latents_speedup": round(decode[f"loader_{workers}_workers_img_s"]
                                           / decode["main_process_one_at_a_time_img_s"], 2),
            "train_reads_per_rank_step": reads,
            "train_row_groups_fewer_x": round(before["row_groups"] / after["row_groups"], 2),
            "train_bytes_read_fewer_x": round(before["bytes_read"] / after["bytes_read"], 2)}
