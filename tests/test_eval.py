"""Evaluation metrics against known answers, the feature extractors, and the ADM npz format."""
import numpy as np
import pytest
import scipy.linalg
import torch
from torchmetrics.functional import structural_similarity_index_measure

from aligntok.eval.features import (INCEPTION_URL, FeatureWeightsError, build_feature_extractor, extract,
                                    nhwc_to_nchw)
from aligntok.eval.metrics import (MetricError, feature_stats, frechet_distance, inception_score, load_stats,
                                   precision_recall, save_stats)
from aligntok.eval.npz import NpzError, load_npz_samples, save_npz_samples
from aligntok.eval.recon import psnr, ssim, to_uint8


def rng(seed=0):
    return np.random.default_rng(seed)


def test_fid_of_a_set_against_itself_is_zero():
    for n, d in ((500, 16), (100, 256)):  # the second covariance is rank-deficient (N < D)
        mu, s = feature_stats(rng().normal(size=(n, d)))
        assert abs(frechet_distance(mu, s, mu, s)) <= 1e-6 * np.trace(s)


def test_fid_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0, -1.0]), np.array([1.0, 1.0, 0.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25, 3.0]), np.array([2.0, 1.0, 1.0, 0.1])
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("d", [8, 64])
def test_fid_matches_sqrtm_for_random_spd_matrices(d):
    r = rng(d)
    a, b = r.normal(size=(d, d)), r.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = r.normal(size=d), r.normal(size=d)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)


def test_broken_statistics_are_an_error_not_a_number():
    s = np.eye(3)
    with pytest.raises(MetricError, match="NaN or Inf"):
        frechet_distance(np.array([0, np.nan, 0]), s, np.zeros(3), s)
    with pytest.raises(MetricError, match="NaN or Inf"):
        frechet_distance(np.zeros(3), np.full((3, 3), np.nan), np.zeros(3), s)
    with pytest.raises(MetricError, match="not positive semi-definite"):
        frechet_distance(np.zeros(3), -np.eye(3), np.zeros(3), s)
    with pytest.raises(MetricError, match="dimensions differ"):
        frechet_distance(np.zeros(3), s, np.zeros(2), np.eye(2))
    with pytest.raises(MetricError, match="NaN or Inf"):
        feature_stats(np.array([[1.0, np.nan], [0.0, 1.0]]))


@pytest.mark.parametrize("case, expected", [("identical", (1.0, 1.0)), ("disjoint", (0.0, 0.0))])
def test_precision_recall_extremes(case, expected):
    real = rng().normal(size=(300, 4))
    fake = real.copy() if case == "identical" else real + 100.0
    assert precision_recall(real, fake) == expected


def test_precision_recall_of_a_tight_subset():
    real = rng().normal(size=(400, 2))
    fake = real[np.linalg.norm(real, axis=1) < 0.5][:60]
    precision, recall = precision_recall(real, fake)
    assert precision == 1.0 and recall < 0.5


def test_precision_recall_batches_agree_with_a_dense_computation(monkeypatch):
    import aligntok.eval.metrics as m
    real, fake = rng(1).normal(size=(150, 5)), rng(2).normal(0.5, 1.0, size=(120, 5))
    dense = precision_recall(real, fake)
    monkeypatch.setattr(m, "ROW_BATCH", 7)
    assert precision_recall(real, fake) == dense
    d_ff = ((fake[:, None] - fake[None]) ** 2).sum(-1)
    d_rr = ((real[:, None] - real[None]) ** 2).sum(-1)
    d_fr = ((fake[:, None] - real[None]) ** 2).sum(-1)
    r_real, r_fake = np.sort(d_rr, 1)[:, 3], np.sort(d_ff, 1)[:, 3]
    assert dense[0] == pytest.approx((d_fr <= r_real[None]).any(1).mean())
    assert dense[1] == pytest.approx((d_fr.T <= r_fake[None]).any(1).mean())


def test_inception_score_known_values():
    classes, splits = 10, 5
    onehot = np.full((1000, classes), -1e4)
    onehot[np.arange(1000), np.arange(1000) % classes] = 0.0
    mean, std = inception_score(onehot, splits=splits)
    assert mean == pytest.approx(classes, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    same = np.zeros((100, classes))
    same[:, 3] = 50.0
    assert inception_score(same, splits=1)[0] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(MetricError):
        inception_score(same, splits=101)


def test_stats_round_trip_and_adm_reference_batch(tmp_path):
    mu, s = feature_stats(rng().normal(size=(50, 3)))
    meta = {"backbone": "efficientnet-lite0", "data_hash": "abc", "count": 50}
    save_stats(tmp_path / "ref.npz", mu, s, meta)
    mu2, s2, meta2 = load_stats(tmp_path / "ref.npz")
    assert np.array_equal(mu, mu2) and np.array_equal(s, s2) and meta2 == meta
    with pytest.raises(MetricError, match="data_hash"):
        save_stats(tmp_path / "x.npz", mu, s, {"backbone": "inception"})
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu, sigma=s)
    _, _, adm_meta = load_stats(tmp_path / "adm.npz")
    assert adm_meta["backbone"] == "inception"
    assert load_npz_samples(tmp_path / "adm.npz")[0].shape == (2, 8, 8, 3)


def test_offline_inception_without_local_file_explains_how_to_provide_it(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FeatureWeightsError) as err:
        build_feature_extractor("inception")
    msg = str(err.value)
    assert "set eval.inception_weights to a local copy of inception-2015-12-05.pt" in msg
    assert INCEPTION_URL in msg and "\n" not in msg
    with pytest.raises(FeatureWeightsError, match="nope.pt not found"):
        build_feature_extractor("inception", str(tmp_path / "nope.pt"))
    with pytest.raises(FeatureWeightsError, match="expected one of"):
        build_feature_extractor("vgg")


class FakeFidInception(torch.nn.Module):
    """Same call signature as the StyleGAN2-ADA TorchScript Inception, tiny body."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Linear(3, 2048)
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        feats = self.layers(img.to(torch.float32).mean((2, 3)) / 255.0)
        if return_features:
            return feats
        logits = torch.nn.functional.linear(feats, self.output.weight) if no_output_bias else self.output(feats)
        return torch.softmax(logits, 1)


def test_inception_from_local_torchscript_gives_bias_free_logits(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(FakeFidInception()), str(path))
    ex = build_feature_extractor("inception", str(path))
    imgs = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    feats, logits = ex(imgs)
    assert ex.name == "inception" and feats.shape == (4, 2048) and logits.shape == (4, 1008)
    probs = ex.net(imgs, no_output_bias=True).double()
    assert torch.allclose(torch.softmax(logits, 1), probs, atol=1e-6)


def shapes(n, seed=0, size=64):
    """Coloured rectangles and discs on flat backgrounds: structured images."""
    r = rng(seed)
    yy, xx = np.mgrid[:size, :size]
    imgs = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        imgs[i] = r.integers(0, 100, 3)
        x, y, w = r.integers(4, size // 2, 3)
        if i % 2:
            imgs[i, y:y + w + 8, x:x + w + 8] = r.integers(150, 256, 3)
        else:
            imgs[i][(yy - y - 8) ** 2 + (xx - x - 8) ** 2 < (w // 2 + 6) ** 2] = r.integers(150, 256, 3)
    return imgs


def test_efficientnet_features_are_deterministic_and_separate_noise_from_structure():
    ex = build_feature_extractor("efficientnet-lite0", feature_dim=112)
    assert ex.name == "efficientnet-lite0" and ex.dim == 112
    structured = shapes(64, 0)
    noise = rng(2).integers(0, 256, (32, 64, 64, 3), dtype=np.uint8)
    fa, la = extract(ex, structured[:32], batch_size=32)
    fa2, _ = extract(ex, [nhwc_to_nchw(structured[:5]), structured[5:12]])
    assert fa.shape == (32, 112) and la.shape == (32, 1000) and fa.dtype == np.float64
    assert np.allclose(fa[:12], fa2, atol=1e-5)
    fb, _ = extract(ex, structured[32:])
    fn, _ = extract(ex, noise)
    halves = frechet_distance(*feature_stats(fa), *feature_stats(fb))
    far = frechet_distance(*feature_stats(fa), *feature_stats(fn))
    assert far > 5 * halves


def test_efficientnet_default_is_the_1280d_head_with_imagenet_classifier():
    ex = build_feature_extractor("efficientnet-lite0")
    feats, logits = ex(nhwc_to_nchw(shapes(3, size=256)))
    assert ex.dim == 1280 and feats.shape == (3, 1280) and logits.shape == (3, 1000)
    assert torch.allclose(logits, ex.net.classifier(feats.float()).double(), atol=1e-4)
    with pytest.raises(FeatureWeightsError, match="feature_dim 100"):
        build_feature_extractor("efficientnet-lite0", feature_dim=100)


def test_random_init_inception_path_is_seeded():
    imgs = nhwc_to_nchw(shapes(1))
    ex = build_feature_extractor("random-init", seed=3)
    f1, l1 = ex(imgs)
    assert ex.name == "random-init" and f1.shape == (1, 2048) and l1.shape == (1, 1000)
    again, other = (build_feature_extractor("random-init", seed=s).net.state_dict() for s in (3, 4))
    w = "Conv2d_1a_3x3.conv.weight"
    assert torch.equal(ex.net.state_dict()[w], again[w]) and not torch.equal(again[w], other[w])
    with pytest.raises(ValueError, match="uint8"):
        build_feature_extractor("random-init")(imgs.float())


def test_psnr_ssim_known_values():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.isinf(psnr(x, x)).all()
    x0 = torch.zeros(1, 3, 16, 16)
    # 0.2 in [-1, 1] is 0.1 in [0, 1]: PSNR = 10 log10(1 / 0.01) = 20 dB
    assert psnr(x0 + 0.2, x0).item() == pytest.approx(20.0, abs=1e-4)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    # torchmetrics averages its reflect-padded full map; Wang et al. (and skimage) average valid windows only
    _, full = structural_similarity_index_measure((y + 1) / 2, (x + 1) / 2, data_range=1.0, reduction="none",
                                                  return_full_image=True)
    ref = full[..., 5:-5, 5:-5].flatten(1).mean(1)
    assert torch.allclose(ssim(y, x), ref, atol=1e-4) and (ssim(y, x) < 1).all()
    assert torch.equal(to_uint8(torch.tensor([[-1.0, 0.0, 1.0, 3.0]])),
                       torch.tensor([[0, 128, 255, 255]], dtype=torch.uint8))


def test_npz_round_trip_and_bad_files(tmp_path):
    imgs = shapes(5)
    save_npz_samples(tmp_path / "s.npz", imgs, np.arange(5))
    back, labels = load_npz_samples(tmp_path / "s.npz")
    assert np.array_equal(back, imgs) and labels.tolist() == [0, 1, 2, 3, 4]
    save_npz_samples(tmp_path / "u.npz", imgs)
    assert load_npz_samples(tmp_path / "u.npz")[1] is None
    np.savez(tmp_path / "bad.npz", arr_0=imgs.astype(np.float32))
    with pytest.raises(NpzError, match=r"bad.npz: arr_0 must be N x H x W x 3 uint8"):
        load_npz_samples(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_text("hello")
    with pytest.raises(NpzError, match="junk.npz: not a readable .npz file"):
        load_npz_samples(tmp_path / "junk.npz")
    with pytest.raises(NpzError, match="labels must be 5 integers"):
        save_npz_samples(tmp_path / "l.npz", imgs, np.arange(4))
    with pytest.raises(NpzError, match="missing.npz: sample file not found"):
        load_npz_samples(tmp_path / "missing.npz")
