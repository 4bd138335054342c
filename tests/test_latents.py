"""Latent cache: resume after interruption, tokenizer-hash guard, exact stats, normalisation round trip."""
import os

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from aligntok.data.dataset import ShardDataset
from aligntok.data.latents import LatentCacheError, compute_stats, denormalize, normalize, read_cache_manifest
from aligntok.data.sources import prepare_dataset
from aligntok.io import write_json_atomic
from aligntok.models.tokenizer import AlignTokenizer
from aligntok.stages.latents import encode_split


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("lat")
    prepare_dataset("synthetic", base / "data", root=None, resolution=32, num_images=40, num_classes=4,
                    val_fraction=0.0, shard_rows=16, seed=0)
    torch.manual_seed(0)
    tok = AlignTokenizer({"kind": "aligntok", "encoder_arch": "tf_efficientnet_lite0", "encoder_pretrained": "none",
                          "image_size": 32, "latent_channels": 4, "size": "tiny", "kl": False,
                          "adapter_hidden": 8}).eval()
    return base, tok, ShardDataset(base / "data", "train")


def encode(out, tok, ds, tok_hash="h1"):
    return encode_split(tok, ds, range(5), out, shard_rows=8, batch_size=4, hflip=True,
                        tok_hash=tok_hash, device=torch.device("cpu"))


def test_interrupted_cache_resumes_and_matches_uninterrupted(setup, tmp_path):
    _, tok, ds = setup
    (tmp_path / "full").mkdir()
    (tmp_path / "part").mkdir()
    records, n_full, reused = encode(tmp_path / "full", tok, ds)
    assert n_full == len(ds) == 40 and reused == 0
    encode(tmp_path / "part", tok, ds)
    shards = sorted((tmp_path / "part").glob("*.safetensors"))
    shards[-1].unlink()  # killed before the last shard was written
    shards[1].write_bytes(shards[1].read_bytes()[:100])  # a torn file
    _, n_resumed, reused = encode(tmp_path / "part", tok, ds)
    assert n_resumed == 8 + 8 and reused == 3  # only the two missing/torn shards were encoded again
    # a shard is encoded in the same batches of 4 whichever run writes it, in one process with one thread
    # count: the re-encoded shards are bit-identical by construction
    for rec in records:
        a, b = load_file(str(tmp_path / "full" / rec["file"])), load_file(str(tmp_path / "part" / rec["file"]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, n_other, reused = encode(tmp_path / "part", tok, ds, tok_hash="h2")
    assert n_other == 40 and reused == 0  # shards made by another tokenizer are not reused


@pytest.mark.numeric
def test_stats_are_exact_and_normalisation_round_trips(setup, tmp_path):
    _, tok, ds = setup
    encode(tmp_path, tok, ds)
    shards = sorted(tmp_path.glob("*.safetensors"))
    stats = compute_stats(shards)
    allz = torch.cat([torch.cat([load_file(str(s))["latents"], load_file(str(s))["latents_flip"]]) for s in shards])
    # float64 sums over 640 values per channel, in another order (chunked; std as E[z^2] - mean^2 with
    # mean^2/var ~ 1.4): ~1e-15 relative, measured <= 2.2e-16 absolute on values ~0.3
    assert_close(torch.tensor(stats["mean"], dtype=torch.float64), allz.double().mean((0, 2, 3)), rtol=1e-10, atol=0)
    assert_close(torch.tensor(stats["std"], dtype=torch.float64), allz.double().std((0, 2, 3), unbiased=False),
                 rtol=1e-10, atol=0)
    z = allz[:5]
    n = normalize(z, stats)
    # fp32 (z - m) / s * s + m on values < 1: a few ulp (measured 3e-8)
    assert_close(denormalize(n, stats), z, rtol=1e-6, atol=1e-6)
    # normalised per channel: mean 0 and std 1 up to fp32 reductions over 640 values (measured 4.8e-8, 6e-8)
    whole = normalize(allz, stats)
    assert_close(whole.mean((0, 2, 3)), torch.zeros(4), rtol=0, atol=1e-5)
    assert_close(whole.std((0, 2, 3), unbiased=False), torch.ones(4), rtol=0, atol=1e-5)


def test_cache_from_another_tokenizer_is_refused(tmp_path):
    write_json_atomic(tmp_path / "manifest.json", {"tokenizer_hash": "aaa", "shards": []})
    assert read_cache_manifest(tmp_path, "aaa")["tokenizer_hash"] == "aaa"
    with pytest.raises(LatentCacheError, match="made by tokenizer aaa, but the current tokenizer is bbb; re-run"):
        read_cache_manifest(tmp_path, "bbb")
    with pytest.raises(LatentCacheError, match="manifest not found; run `aligntok cache-latents` first"):
        read_cache_manifest(tmp_path / "none")
    assert not os.path.exists(tmp_path / "none")
