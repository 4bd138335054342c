"""Latent cache on disk: memory-mapped items, exact float64 stats, tokenizer guard, epochs over source images."""
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from aligntok.config import DitConfig, TrainConfig
from aligntok.data import latents as latents_module
from aligntok.data.latents import LatentCacheError, LatentDataset, compute_stats
from aligntok.io import write_json_atomic
from aligntok.stages.dit import resolve_steps
from aligntok.train.dist import DistInfo
from aligntok.train.loop import StepBatches, train

SHAPE = (4, 2, 2)
ROWS = (5, 7, 4)  # three shards, 16 source images


def make_cache(folder, identity=False, flip=True, tok="t1"):
    """A cache as cache-latents writes it. `identity`: every latent is filled with its index (flips: -index-1)."""
    g = torch.Generator().manual_seed(0)
    zs, zfs, ys, start, shards = [], [], [], 0, []
    for k, rows in enumerate(ROWS):
        idx = torch.arange(start, start + rows)
        if identity:
            z = idx.float()[:, None, None, None].expand(rows, *SHAPE).contiguous()
            zf = -z - 1
        else:
            z = torch.randn(rows, *SHAPE, generator=g) * 3 + 1.5
            zf = z.flip(-1)
        y = idx % 3
        tensors = {"latents": z, "labels": y, "indices": idx, **({"latents_flip": zf} if flip else {})}
        name = f"latents-r000-{k:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"tokenizer_hash": tok})
        shards.append({"file": name, "rows": rows})
        zs.append(z), zfs.append(zf), ys.append(y)
        start += rows
    stats = compute_stats([folder / s["file"] for s in shards])
    write_json_atomic(folder / "manifest.json", {
        "tokenizer_hash": tok, "num_classes": 3, "latent_shape": list(SHAPE), "hflip": flip, "count": start,
        "data_content_hash": "d", "shards": shards, "latent_stats": stats})
    return torch.cat(zs), torch.cat(zfs), torch.cat(ys)


def test_memmap_round_trip_is_bit_exact_and_shares_no_copies(tmp_path):
    z, zf, y = make_cache(tmp_path)
    ds = LatentDataset(tmp_path, "t1")
    n = len(y)
    assert ds.num_source_images == n and ds.num_variants == 2 and len(ds) == 2 * n
    assert all(isinstance(m["latents"], np.memmap) for m in ds._shards())  # mapped, not loaded
    for i in range(n):  # float32 rows copied out of the map: exactly the stored values
        assert torch.equal(ds[i][0], z[i]) and ds[i][1] == int(y[i])
        assert torch.equal(ds[n + i][0], zf[i]) and ds[n + i][1] == int(y[i])
    # the old eager attributes, for small sets: variants stacked as before (all latents, then all flips)
    assert torch.equal(ds.latents, torch.cat([z, zf])) and torch.equal(ds.labels, torch.cat([y, y]))
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # a DataLoader worker gets paths and offsets, never the latents
    assert torch.equal(pickle.loads(blob)[n + 3][0], zf[3])
    sampler = StepBatches(n, 8, 4, 0, seed=0, variants=2)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=2)
    for (x, labels), idx in zip(loader, StepBatches(n, 8, 4, 0, seed=0, variants=2)):
        assert torch.equal(x, torch.stack([ds[i][0] for i in idx])) and labels.tolist() == [ds[i][1] for i in idx]


def test_stats_are_exact_float64_and_deterministic(tmp_path):
    z, zf, _ = make_cache(tmp_path)
    shards = sorted(tmp_path.glob("*.safetensors"))
    stats = compute_stats(shards)
    assert stats == compute_stats(shards)  # same files, same fixed summation order: bit-identical
    allz = torch.cat([z, zf]).double()
    # Both sides accumulate float32 values in float64; they differ only in summation order, which moves the
    # result by O(n * 2**-53) relative (n = 128 values per channel here): 1e-10 leaves a wide margin.
    torch.testing.assert_close(torch.tensor(stats["mean"], dtype=torch.float64), allz.mean((0, 2, 3)),
                               rtol=1e-10, atol=1e-12)
    # E[x^2] - mean^2 vs the two-pass std: cancellation scales the error by (var + mean^2) / var ~ 1.3 here
    torch.testing.assert_close(torch.tensor(stats["std"], dtype=torch.float64),
                               allz.std((0, 2, 3), unbiased=False), rtol=1e-10, atol=1e-12)
    assert stats["count"] == allz.shape[0] * SHAPE[1] * SHAPE[2]


def test_cache_of_another_tokenizer_and_torn_shards_are_refused_in_one_line(tmp_path):
    make_cache(tmp_path)
    with pytest.raises(LatentCacheError, match="made by tokenizer t1, but the current tokenizer is t2; re-run"):
        LatentDataset(tmp_path, "t2")
    shard = tmp_path / "latents-r000-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(LatentCacheError) as err:
        LatentDataset(tmp_path, "t1")
    assert "\n" not in str(err.value) and str(err.value).startswith(str(shard))
    assert "re-run `aligntok cache-latents`" in str(err.value)


def test_without_flips_every_item_is_a_source_image(tmp_path):
    z, _, y = make_cache(tmp_path, flip=False)
    ds = LatentDataset(tmp_path)
    assert ds.num_variants == 1 and len(ds) == ds.num_source_images == len(y)
    assert torch.equal(ds.latents, z) and torch.equal(ds.labels, y)


def rewrite_shard(folder, k, **tensors):
    """Replace (or, with None, drop) tensors of shard k, as a buggy or interrupted writer might leave it."""
    path = folder / f"latents-r000-{k:05d}.safetensors"
    t = {**load_file(str(path)), **tensors}
    save_file({name: v for name, v in t.items() if v is not None}, str(path), metadata={"tokenizer_hash": "t1"})
    return path


def test_dataset_carries_the_manifest_stats_and_class_count(tmp_path):
    make_cache(tmp_path)
    ds = LatentDataset(tmp_path, "t1")
    assert ds.stats == compute_stats(sorted(tmp_path.glob("*.safetensors"))) and ds.num_classes == 3


@pytest.mark.parametrize("case", ["latent_shape", "flip_shape", "rows", "label_rows", "flip_rows", "flip_missing"])
def test_a_shard_that_disagrees_with_the_manifest_is_refused(tmp_path, case):
    make_cache(tmp_path)
    z = torch.zeros(7, *SHAPE)  # shard 1 holds 7 rows of SHAPE
    changes = {"latent_shape": {"latents": torch.zeros(7, 4, 2, 3)},
               "flip_shape": {"latents_flip": torch.zeros(7, 2, 2, 2)},
               "rows": {"latents": z[:6]}, "label_rows": {"labels": torch.zeros(8, dtype=torch.int64)},
               "flip_rows": {"latents_flip": z[:6]}, "flip_missing": {"latents_flip": None}}[case]
    path = rewrite_shard(tmp_path, 1, **changes)
    with pytest.raises(LatentCacheError, match="re-run `aligntok cache-latents`") as err:
        LatentDataset(tmp_path, "t1")
    assert str(err.value).startswith(str(path))


@pytest.mark.parametrize("flip", [True, False])
def test_indices_past_the_end_are_an_index_error(tmp_path, flip):
    make_cache(tmp_path, flip=flip)
    ds = LatentDataset(tmp_path, "t1")
    for i in (len(ds), len(ds) + 1, -1):  # IndexError also ends `for item in ds` at len(ds)
        with pytest.raises(IndexError):
            ds[i]
    assert len(list(ds)) == len(ds)


def test_items_are_float32_whatever_dtype_the_shard_stores(tmp_path):
    z, _, y = make_cache(tmp_path, flip=False)
    half = z[5:12].half()  # safetensors F16 is a format the reader maps; float16 -> float32 is exact
    rewrite_shard(tmp_path, 1, latents=half)
    ds = LatentDataset(tmp_path, "t1")
    x, label = ds[5]
    assert x.dtype == torch.float32 and torch.equal(x, half[0].float()) and label == int(y[5])
    assert torch.equal(x, ds.latents[5])  # the same values as the eager attribute


def test_shards_are_opened_once_per_process(tmp_path, monkeypatch):
    make_cache(tmp_path)
    ds = LatentDataset(tmp_path, "t1")
    opened = []
    real = latents_module.memmap_safetensors
    monkeypatch.setattr(latents_module, "memmap_safetensors", lambda p: opened.append(p) or real(p))
    for i in range(len(ds)):
        ds[i]
    assert opened == []  # items read the maps opened in __init__: no header parsing or mmap per item
    ds._pid = -1  # as in a forked DataLoader worker: that process maps the shards itself, once
    ds[0], ds[1]
    assert len(opened) == len(ROWS)


def test_a_pickled_dataset_carries_no_latents(tmp_path):
    rows, shape = 256, (4, 16, 16)  # 1 MiB of float32 latents
    save_file({"latents": torch.ones(rows, *shape), "labels": torch.zeros(rows, dtype=torch.int64)},
              str(tmp_path / "s.safetensors"))
    write_json_atomic(tmp_path / "manifest.json", {
        "tokenizer_hash": "t1", "num_classes": 1, "latent_shape": list(shape),
        "shards": [{"file": "s.safetensors", "rows": rows}],
        "latent_stats": {"mean": [1.0] * 4, "std": [1.0] * 4, "count": rows * 256}})
    ds = LatentDataset(tmp_path, "t1")
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # paths and offsets only: a DataLoader worker maps the file itself
    assert torch.equal(pickle.loads(blob)[rows - 1][0], torch.ones(shape))


class Recorder:
    """A recipe that trains nothing and records which latents each step saw."""

    def __init__(self):
        self.m = nn.Linear(1, 1)
        self.opt = torch.optim.SGD(self.m.parameters(), lr=0.0)
        self.seen: dict[int, list[float]] = {}

    def modules(self):
        return {"m": self.m}

    def ema_modules(self):
        return {}

    def optimizers(self):
        return {"o": self.opt}

    def wrap(self, fn):
        pass

    def losses(self, batch, step):
        self.seen[step] = batch[0][:, 0, 0, 0].tolist()
        return {"o": (self.m.weight ** 2).sum()}, {"loss": 0.0}

    def preview(self, batch, step):
        return None


def test_epochs_count_source_images_and_each_draws_one_variant_per_image(tmp_path):
    make_cache(tmp_path, identity=True)
    ds = LatentDataset(tmp_path)
    n, batch = ds.num_source_images, 8
    steps, epochs = resolve_steps(DitConfig(epochs=3, batch_size=batch), n)
    assert (steps, epochs) == (3 * n // batch, 3.0)  # flips do not make an epoch twice as long
    rec = Recorder()
    train(rec, ds, TrainConfig(steps=steps, batch_size=batch, log_every=100, ckpt_every=100),
          dist=DistInfo(0, 1, 0, torch.device("cpu")), ckpt_dir=tmp_path / "ckpt", config_hash="h", seed=0)
    values = [v for s in range(steps) for v in rec.seen[s]]
    variants = []
    for e in range(3):
        epoch = values[e * n:(e + 1) * n]
        sources = sorted(int(v) if v >= 0 else int(-v - 1) for v in epoch)
        assert sources == list(range(n)), f"epoch {e} does not see every source image once"
        variants += [v < 0 for v in epoch]
    assert 0 < sum(variants) < len(variants)  # both the cached and the flipped copy are drawn
