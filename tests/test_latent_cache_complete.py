"""cache-latents assembles exactly the shards its world size must have written, or stops with one line."""
import pytest
import torch
from safetensors.torch import save_file

from aligntok.data.latents import LatentCacheError
from aligntok.stages.latents import expected_shards


def _shard(path, indices, tok="t"):
    z = torch.zeros(len(indices), 2, 2, 2)
    save_file({"latents": z, "labels": torch.zeros(len(indices), dtype=torch.int64),
               "indices": torch.tensor(indices, dtype=torch.int64)}, str(path), metadata={"tokenizer_hash": tok})


def test_complete_cache_for_two_ranks(tmp_path):
    # 10 images, 2 ranks, 3 rows per shard: rank 0 holds 0-4 (2 shards), rank 1 holds 5-9 (2 shards)
    for name, idx in [("latents-r000-00000", [0, 1, 2]), ("latents-r000-00001", [3, 4]),
                      ("latents-r001-00000", [5, 6, 7]), ("latents-r001-00001", [8, 9])]:
        _shard(tmp_path / f"{name}.safetensors", idx)
    names = expected_shards(tmp_path, 10, 2, 3, "t")
    assert len(names) == 4
    (tmp_path / "latents-r001-00001.safetensors").unlink()
    with pytest.raises(LatentCacheError, match=r"latents-r001-00001.safetensors: missing or not this run's shard"):
        expected_shards(tmp_path, 10, 2, 3, "t")


def test_shards_from_another_world_size_or_tokenizer_are_not_mixed_in(tmp_path):
    # a one-rank run left r000-00000 with images 0-2; a two-rank layout expects the same name with 0-2 too,
    # but r000-00001 = [3, 4] vs the one-rank [3, 4, 5]: the stale file must be refused
    _shard(tmp_path / "latents-r000-00000.safetensors", [0, 1, 2])
    _shard(tmp_path / "latents-r000-00001.safetensors", [3, 4, 5])
    _shard(tmp_path / "latents-r001-00000.safetensors", [5, 6, 7])
    _shard(tmp_path / "latents-r001-00001.safetensors", [8, 9])
    with pytest.raises(LatentCacheError, match="r000-00001"):
        expected_shards(tmp_path, 10, 2, 3, "t")
    _shard(tmp_path / "latents-r000-00001.safetensors", [3, 4], tok="other-tokenizer")
    with pytest.raises(LatentCacheError, match="r000-00001"):
        expected_shards(tmp_path, 10, 2, 3, "t")
