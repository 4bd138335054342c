"""The pieces of distributed evaluation, in one process: reference statistics from sums, blocked precision/recall,
per-index labels, resumable sample parts, ADM reference-batch checks and the streaming .npz writer."""
import numpy as np
import pytest
import torch

from aligntok.eval.coord import Coord
from aligntok.eval.metrics import feature_stats, precision_recall
from aligntok.eval.npz import NpzError, check_reference_npz, load_npz_samples, save_npz_streaming
from aligntok.eval.parts import PartStore, Variant, split_parts
from aligntok.eval.reference import stats_from_sums, train_reference
from aligntok.generate import sample_labels


@pytest.mark.numeric
def test_stats_from_sums_match_np_cov():
    f = np.random.default_rng(0).normal(0.3, 2.0, size=(500, 16))
    mu, sigma = stats_from_sums(len(f), f.sum(0), f.T @ f)
    ref_mu, ref_sigma = feature_stats(f)
    # one-pass sums vs numpy's two-pass covariance: cancellation costs ~|mu|^2/var * 1e-16, here ~1e-15
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-10, atol=1e-12)


@pytest.mark.numeric
def test_blocked_precision_recall_equals_the_dense_estimate(monkeypatch):
    import aligntok.eval.metrics as m
    r = np.random.default_rng(3)
    real, fake = r.normal(size=(90, 6)), r.normal(0.3, 1.0, size=(70, 6))
    d_rr, d_ff = (((x[:, None] - x[None]) ** 2).sum(-1) for x in (real, fake))
    d_fr = ((fake[:, None] - real[None]) ** 2).sum(-1)
    r_real, r_fake = np.sort(d_rr, 1)[:, 3], np.sort(d_ff, 1)[:, 3]
    # Counts are exact when no distance lies within rounding (~1e-15 relative, any kernel or block shape) of a
    # k-NN radius; the nearest such tie here is far from that (asserted), so exact equality is justified.
    margin = min((np.abs(d_fr - r_real[None]) / r_real[None]).min(),
                 (np.abs(d_fr.T - r_fake[None]) / r_fake[None]).min())
    assert margin > 1e-9, margin
    dense = ((d_fr <= r_real[None]).any(1).mean(), (d_fr.T <= r_fake[None]).any(1).mean())
    assert precision_recall(real, fake) == dense
    monkeypatch.setattr(m, "ROW_BATCH", 8)
    monkeypatch.setattr(m, "COL_BATCH", 5)  # fewer columns than k + 1 in a block: the carry must handle it
    assert precision_recall(real, fake) == dense


@pytest.mark.parametrize("mode", ["balanced", "random"])
def test_labels_depend_only_on_seed_and_index(mode):
    whole = sample_labels(range(100), 10, mode, seed=5)
    assert torch.equal(sample_labels(range(40, 60), 10, mode, seed=5), whole[40:60])
    assert whole.min() >= 0 and whole.max() < 10
    if mode == "random":
        assert not torch.equal(whole, sample_labels(range(100), 10, mode, seed=6))
        assert len(set(sample_labels(range(2000), 10, mode, 0).tolist())) == 10


def test_streaming_npz_round_trip_and_count_check(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (7, 5, 5, 3), dtype=np.uint8)
    save_npz_streaming(tmp_path / "s.npz", 7, [imgs[:3], imgs[3:]], np.arange(7))
    back, labels = load_npz_samples(tmp_path / "s.npz")
    assert np.array_equal(back, imgs) and labels.tolist() == list(range(7))
    with pytest.raises(NpzError, match="expected 8 images"):
        save_npz_streaming(tmp_path / "t.npz", 8, [imgs], np.arange(8))
    assert not (tmp_path / "t.npz").exists() and not list(tmp_path.glob(".*.tmp"))


def test_reference_batch_layout_checks(tmp_path):
    imgs = np.zeros((4, 8, 8, 3), np.uint8)
    cases = {
        "only_mu": ({"arr_0": imgs, "mu": np.zeros(3)}, "only one of mu/sigma"),
        "int_mu": ({"arr_0": imgs, "mu": np.zeros(3, int), "sigma": np.eye(3)}, "mu must be a float vector of 3"),
        "sigma": ({"arr_0": imgs, "mu": np.zeros(3), "sigma": np.eye(2)}, "sigma must be a 3 x 3 float matrix"),
        "no_images": ({"mu": np.zeros(3), "sigma": np.eye(3)}, "no arr_0"),
        "float_images": ({"arr_0": imgs.astype(np.float32)}, "arr_0 must be N x H x W x 3 uint8"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(NpzError, match=message):
            check_reference_npz(tmp_path / f"{name}.npz", 3)
    (tmp_path / "junk.npz").write_text("no zip")
    with pytest.raises(NpzError, match="junk.npz: not a readable .npz archive"):
        check_reference_npz(tmp_path / "junk.npz", None)
    np.savez(tmp_path / "ok.npz", arr_0=imgs, mu=np.zeros(3, np.float32), sigma=np.eye(3))
    assert check_reference_npz(tmp_path / "ok.npz", 3) is True
    np.savez(tmp_path / "plain.npz", arr_0=imgs)
    assert check_reference_npz(tmp_path / "plain.npz", 3) is False


def test_parts_are_validated_before_reuse(tmp_path):
    store = PartStore(tmp_path, "0123456789abcdef", num_classes=10, label_mode="balanced", seed=0)
    v = Variant("_cfg", 4.0)
    parts = split_parts(v, 10, 4)
    assert [(p.start, p.stop) for p in parts] == [(0, 4), (4, 8), (8, 10)]
    for p in parts:
        store.write(p, {"arr_0": np.zeros((p.size, 2, 2, 3), np.uint8), "arr_1": store.labels(p),
                        "features": np.zeros((p.size, 5)), "logits": np.zeros((p.size, 7)),
                        "meta": {"features": "tag-a", "gen_seconds": 1.0}})
    assert store.plan(parts, "tag-a") == []
    assert store.plan(parts, "tag-b") == [("features", p) for p in parts]
    store.path(parts[1]).write_bytes(store.path(parts[1]).read_bytes()[:100])  # torn
    other = PartStore(tmp_path, "fedcba9876543210", 10, "balanced", 0)
    other.dir.mkdir()
    store.path(parts[2]).rename(other.path(parts[2]))  # a part of another key (another DiT, other settings)
    assert store.plan(parts, "tag-a") == [("make", parts[1]), ("make", parts[2])]
    assert other.read(parts[2]) is None  # a part of another key is never taken for this one
    assert store.prune_other_keys() == ["fedcba9876543210"] and store.dir.exists()


class MeanColour:
    """A stand-in feature extractor: per-channel means and their squares (6-d), for exact known statistics."""
    name, dim, tag = "mean-colour", 6, "mean-colour-6-test"

    def __call__(self, x):
        m = x.double().mean((2, 3))
        return torch.cat([m, m * m], 1), m


@pytest.mark.numeric
def test_train_reference_is_the_statistics_of_every_train_image(tmp_path):
    from aligntok.data.dataset import ShardDataset
    from aligntok.data.sources import prepare_dataset
    from aligntok.eval.reconstruction import to_uint8

    prepare_dataset("synthetic", tmp_path / "data", root=None, resolution=16, num_images=60, num_classes=3,
                    val_fraction=0.1, shard_rows=16, seed=0)
    ref = train_reference(MeanColour(), Coord(), tmp_path / "data", tmp_path / "ref", "toy-train", batch_size=7)
    train = ShardDataset(tmp_path / "data", "train")
    x = to_uint8(torch.stack([train[i][0] for i in range(len(train))]))
    feats = MeanColour()(x)[0].numpy()
    mu, sigma = feature_stats(feats)
    # sums over batches of 7 vs numpy's two-pass mean/cov of the same float64 features
    np.testing.assert_allclose(ref["mu"], mu, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(ref["sigma"], sigma, rtol=1e-9, atol=1e-9)
    assert np.array_equal(ref["features"], feats) and ref["count"] == len(train) and ref["stats"] == "train-split"
    again = train_reference(MeanColour(), Coord(), tmp_path / "data", tmp_path / "ref", "toy-train", batch_size=7)
    assert np.array_equal(again["sigma"], ref["sigma"])  # read from the cache
