"""Evaluation metrics against known answers, the offline feature extractors, and the npz format."""
import numpy as np
import pytest
import scipy.linalg
import torch

from aligntok.eval.features import FeatureWeightsError, build_feature_extractor, extract
from aligntok.eval.metrics import (MetricError, feature_stats, frechet_distance, inception_score, load_stats,
                                   precision_recall, save_stats)
from aligntok.eval.npz import NpzError, load_npz_samples, save_npz_samples
from aligntok.eval.recon import psnr, ssim, to_uint8


def rng(seed=0):
    return np.random.default_rng(seed)


def test_fid_of_a_set_against_itself_is_zero():
    f = rng().normal(size=(500, 16))
    mu, s = feature_stats(f)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-8)


def test_fid_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, abs=1e-3)


def test_fid_matches_sqrtm_for_random_spd_matrices():
    r = rng(1)
    a, b = r.normal(size=(8, 8)), r.normal(size=(8, 8))
    s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
    mu1, mu2 = r.normal(size=8), r.normal(size=8)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)


def test_nan_statistics_are_an_error_not_a_number():
    s = np.eye(3)
    with pytest.raises(MetricError, match="NaN or Inf; refusing to report an FID"):
        frechet_distance(np.array([0, np.nan, 0]), s, np.zeros(3), s)


@pytest.mark.parametrize("case, expected", [("identical", (1.0, 1.0)), ("disjoint", (0.0, 0.0))])
def test_precision_recall_extremes(case, expected):
    real = rng().normal(size=(200, 4))
    fake = real.copy() if case == "identical" else real + 100.0
    assert precision_recall(real, fake) == expected


def test_precision_recall_of_a_tight_subset():
    real = rng().normal(size=(400, 2))
    fake = real[np.linalg.norm(real, axis=1) < 0.5][:60]
    precision, recall = precision_recall(real, fake)
    assert precision == 1.0 and recall < 0.5


def test_inception_score_known_values():
    classes = 10
    onehot = np.full((1000, classes), -1e4)
    onehot[np.arange(1000), np.arange(1000) % classes] = 0.0
    assert inception_score(onehot, splits=1)[0] == pytest.approx(classes, rel=1e-6)
    same = np.zeros((100, classes))
    same[:, 3] = 50.0
    assert inception_score(same, splits=1)[0] == pytest.approx(1.0, abs=1e-6)


def test_stats_round_trip(tmp_path):
    mu, s = feature_stats(rng().normal(size=(50, 3)))
    save_stats(tmp_path / "ref.npz", mu, s, {"backbone": "efficientnet-lite0"})
    mu2, s2, meta = load_stats(tmp_path / "ref.npz")
    assert np.array_equal(mu, mu2) and np.array_equal(s, s2) and meta == {"backbone": "efficientnet-lite0"}


def test_offline_inception_without_local_file_explains_how_to_provide_it(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FeatureWeightsError) as err:
        build_feature_extractor("inception")
    assert "set eval.inception_weights to the local inception-2015-12-05.pt" in str(err.value)
    with pytest.raises(FeatureWeightsError, match="eval.inception_weights: .*nope.pt not found"):
        build_feature_extractor("inception", str(tmp_path / "nope.pt"))


def shapes(n, seed=0):
    """Coloured squares on flat backgrounds: structured images."""
    r = rng(seed)
    imgs = np.zeros((n, 64, 64, 3), np.uint8)
    for i in range(n):
        imgs[i] = r.integers(0, 100, 3)
        x, y, w = r.integers(5, 30, 3)
        imgs[i, y:y + w + 10, x:x + w + 10] = r.integers(150, 256, 3)
    return imgs


def test_efficientnet_features_are_deterministic_and_separate_noise_from_structure():
    ex = build_feature_extractor("efficientnet-lite0")
    a, b = shapes(64, 0), shapes(64, 1)
    noise = rng(2).integers(0, 256, (64, 64, 64, 3), dtype=np.uint8)
    fa, la = extract(ex, a, batch_size=32)
    fa2, _ = extract(ex, a, batch_size=16)
    assert fa.shape == (64, ex.dim) and la.shape == (64, 1000)
    assert np.allclose(fa, fa2, atol=1e-5)
    fb, _ = extract(ex, b)
    fn, _ = extract(ex, noise)
    same = frechet_distance(*feature_stats(fa), *feature_stats(fb))
    far = frechet_distance(*feature_stats(fa), *feature_stats(fn))
    assert far > 3 * same


def test_random_init_inception_path_runs_seeded():
    imgs = torch.from_numpy(shapes(2)).permute(0, 3, 1, 2).contiguous()
    f1, l1 = build_feature_extractor("random-init", seed=3)(imgs)
    f2, _ = build_feature_extractor("random-init", seed=3)(imgs)
    assert f1.shape == (2, 2048) and l1.shape == (2, 1000) and torch.allclose(f1, f2)


def test_psnr_ssim_known_values():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.isinf(psnr(x, x)).all() or (psnr(x, x) > 100).all()
    y = (x + 0.2).clamp(-1, 1)
    x0 = torch.zeros(1, 3, 16, 16)
    # offset of 0.2 in [-1, 1] is 0.1 in [0, 1]: PSNR = 10 log10(1 / 0.01) = 20 dB
    assert psnr(x0 + 0.2, x0).item() == pytest.approx(20.0, abs=1e-4)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    assert (ssim(y, x) < 1).all()
    assert torch.equal(to_uint8(torch.tensor([[-1.0, 0.0, 1.0]])), torch.tensor([[0, 128, 255]], dtype=torch.uint8))


def test_npz_round_trip_and_bad_files(tmp_path):
    imgs = shapes(5)
    save_npz_samples(tmp_path / "s.npz", imgs, np.arange(5))
    back, labels = load_npz_samples(tmp_path / "s.npz")
    assert np.array_equal(back, imgs) and labels.tolist() == [0, 1, 2, 3, 4]
    np.savez(tmp_path / "bad.npz", arr_0=imgs.astype(np.float32))
    with pytest.raises(NpzError, match="arr_0 must be N x H x W x 3 uint8"):
        load_npz_samples(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_text("hello")
    with pytest.raises(NpzError, match="not a readable .npz file"):
        load_npz_samples(tmp_path / "junk.npz")
