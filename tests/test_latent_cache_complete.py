"""cache-latents assembles exactly the shards of the split, or stops with one line."""
import pytest
import torch
from safetensors.torch import save_file

from aligntok.data.latents import LatentCacheError
from aligntok.stages.latents import expected_shards


def _shard(path, indices, tok="t"):
    z = torch.zeros(len(indices), 2, 2, 2)
    save_file({"latents": z, "labels": torch.zeros(len(indices), dtype=torch.int64),
               "indices": torch.tensor(indices, dtype=torch.int64)}, str(path), metadata={"tokenizer_hash": tok})


def test_complete_cache(tmp_path):
    # 10 images, 3 rows per shard: 0-2, 3-5, 6-8, 9, whichever rank wrote each
    for k, idx in enumerate([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]):
        _shard(tmp_path / f"latents-{k:05d}.safetensors", idx)
    names = expected_shards(tmp_path, 10, 3, "t")
    assert names == [f"latents-{k:05d}.safetensors" for k in range(4)]
    (tmp_path / "latents-00003.safetensors").unlink()
    with pytest.raises(LatentCacheError, match=r"latents-00003.safetensors: missing or not this run's shard"):
        expected_shards(tmp_path, 10, 3, "t")


def test_shards_with_other_rows_or_tokenizer_are_not_mixed_in(tmp_path):
    # a run with shard_rows 2 left latents-00001 with images 2-3; with 3 rows per shard it must hold 3-5
    _shard(tmp_path / "latents-00000.safetensors", [0, 1, 2])
    _shard(tmp_path / "latents-00001.safetensors", [2, 3])
    _shard(tmp_path / "latents-00002.safetensors", [6, 7, 8])
    _shard(tmp_path / "latents-00003.safetensors", [9])
    with pytest.raises(LatentCacheError, match="latents-00001"):
        expected_shards(tmp_path, 10, 3, "t")
    _shard(tmp_path / "latents-00001.safetensors", [3, 4, 5], tok="other-tokenizer")
    with pytest.raises(LatentCacheError, match="latents-00001"):
        expected_shards(tmp_path, 10, 3, "t")
    _shard(tmp_path / "latents-00001.safetensors", [3, 4, 5])
    assert len(expected_shards(tmp_path, 10, 3, "t")) == 4
