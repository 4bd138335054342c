"""Evaluation metrics against known answers, the feature extractors, and the ADM npz format."""
import re

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.testing import assert_close
from torchmetrics.functional import structural_similarity_index_measure

from aligntok.eval.features import (INCEPTION_URL, FeatureWeightsError, build_feature_extractor, extract,
                                    nhwc_to_nchw)
from aligntok.eval.metrics import (MetricError, feature_stats, frechet_distance, inception_score, load_stats,
                                   precision_recall, save_stats)
from aligntok.eval.npz import NpzError, load_npz_samples, save_npz_samples
from aligntok.eval.reconstruction import psnr, ssim, to_uint8


def rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.numeric
def test_fid_of_a_set_against_itself_is_zero():
    for n, d in ((500, 16), (100, 256)):  # the second covariance is rank-deficient (N < D)
        mu, s = feature_stats(rng().normal(size=(n, d)))
        # float64 eigensolvers: the trace terms cancel to ~1e-15 relative (measured <= 1.4e-14 absolute);
        # 1e-6 of the trace is the same bound frechet_distance itself uses to call statistics broken
        assert abs(frechet_distance(mu, s, mu, s)) <= 1e-6 * np.trace(s)


@pytest.mark.numeric
def test_fid_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0, -1.0]), np.array([1.0, 1.0, 0.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25, 3.0]), np.array([2.0, 1.0, 1.0, 0.1])
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    # 4x4 float64 eigensolvers on diagonal matrices: exact to ~1e-15; 1e-9 relative is still far below any
    # error in the formula (a wrong square root is off by O(1))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.numeric
@pytest.mark.parametrize("d", [8, 64])
def test_fid_matches_sqrtm_for_random_spd_matrices(d):
    r = rng(d)
    a, b = r.normal(size=(d, d)), r.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = r.normal(size=d), r.normal(size=d)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    # two float64 algorithms (eigh vs Schur sqrtm) on SPD matrices with condition number <= ~1e4: they agree
    # to ~1e-12 relative; rel 1e-6 leaves room for LAPACK/BLAS builds and thread counts
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


@pytest.mark.numeric
def test_feature_stats_of_float32_features_are_float64():
    # 1 + 2**-24 rounds back to 1 in float32 but not in float64: the float64 sums here are exact, so the mean is
    # exactly 1/4 + (3/4) 2**-24, and the covariance of one varying column is checked against np.var (ddof=1)
    tiny = 2.0 ** -24
    x = np.array([[1.0, 0.0], [tiny, 0.0], [tiny, 0.0], [tiny, 0.0]], dtype=np.float32)
    mu, sigma = feature_stats(x)
    assert mu.dtype == np.float64 and mu[0] == 0.25 + 0.75 * tiny and mu[1] == 0.0
    # same float64 data and formula: only the summation order can differ, ~1e-16 relative
    assert sigma == pytest.approx(np.diag([np.var(x[:, 0].astype(np.float64), ddof=1), 0.0]), rel=1e-12, abs=0)


@pytest.mark.parametrize("features", [np.zeros((1, 3)), np.zeros(5), np.zeros((2, 3, 4))])
def test_feature_stats_need_at_least_two_feature_vectors(features):
    with pytest.raises(MetricError, match="expected an"):
        feature_stats(features)


def test_broken_statistics_errors_say_which_set_and_matrix():
    s, bad_mu = np.eye(2), np.array([0.0, np.nan])
    with pytest.raises(MetricError, match="^stats 1: statistics contain NaN"):
        frechet_distance(bad_mu, s, np.zeros(2), s)
    with pytest.raises(MetricError, match="^stats 2: statistics contain NaN"):
        frechet_distance(np.zeros(2), s, bad_mu, s)
    with pytest.raises(MetricError, match=r"^stats 1: expected mu \(D,\) and sigma \(D, D\)"):
        frechet_distance(np.zeros(3), s, np.zeros(3), np.eye(3))
    with pytest.raises(MetricError, match="^sigma1 is not positive semi-definite"):
        frechet_distance(np.zeros(2), -s, np.zeros(2), s)
    with pytest.raises(MetricError, match="^sigma2 is not positive semi-definite"):
        frechet_distance(np.zeros(2), s, np.zeros(2), -s)


@pytest.mark.numeric
@pytest.mark.parametrize("diag, fd", [((1.0, -1e-6), 1.0 - 1e-6), ((100.0, -5e-5), 82.0 - 5e-5),
                                      ((0.5, -1.5e-6), None)])
def test_negative_eigenvalue_tolerance_is_a_fraction_of_the_largest_but_at_least_eig_tol(diag, fd):
    # sigma1 = diag(a, b) against sigma2 = I, equal means. LAPACK returns a diagonal matrix's eigenvalues exactly,
    # so b is compared with -EIG_TOL * max(1, a) = -1e-6 * max(1, a) exactly: b = -1e-6 at a = 1 sits on the
    # bound (tolerated), -5e-5 is within 1e-4 at a = 100, and -1.5e-6 at a = 0.5 is beyond 1e-6 (refused).
    # A tolerated b is clipped to 0 in the square root: FD = (a + b) + 2 - 2 (sqrt(a) + 0), which float64 gets to
    # ~1e-14 (rel 1e-12 is a wide margin)
    if fd is None:
        with pytest.raises(MetricError, match="not positive semi-definite"):
            frechet_distance(np.zeros(2), np.diag(diag), np.zeros(2), np.eye(2))
    else:
        assert frechet_distance(np.zeros(2), np.diag(diag), np.zeros(2), np.eye(2)) == pytest.approx(fd, rel=1e-12)


def test_eigendecompositions_run_on_one_thread_and_restore_the_count(monkeypatch):
    # documented in _psd_eigh: multi-threaded eigh slowed from 0.4 s to 24 s whenever another process held a core
    threads_seen = []
    for name in ("eigh", "eigvalsh"):
        real = getattr(torch.linalg, name)
        monkeypatch.setattr(torch.linalg, name, lambda m, real=real: threads_seen.append(torch.get_num_threads())
                            or real(m))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        frechet_distance(np.zeros(3), np.eye(3), np.ones(3), 2 * np.eye(3))
        assert threads_seen == [1, 1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.numeric
@pytest.mark.parametrize("case, expected", [("identical", (1.0, 1.0)), ("disjoint", (0.0, 0.0))])
def test_precision_recall_extremes(case, expected):
    real = rng().normal(size=(300, 4))
    fake = real.copy() if case == "identical" else real + 100.0
    # exact: every fake lies at distance ~0 (identical) or >= ~100 (disjoint) from the nearest real point, while
    # the k-NN radii are O(0.1-1): no rounding of the float64 distances can move a point across a radius
    assert precision_recall(real, fake) == expected


@pytest.mark.numeric
def test_precision_recall_of_a_tight_subset():
    real = rng().normal(size=(400, 2))
    fake = real[np.linalg.norm(real, axis=1) < 0.5][:60]
    precision, recall = precision_recall(real, fake)
    # the fakes are copies of real points (distance ~0 to themselves, inside their own k-NN ball): exactly 1
    assert precision == 1.0 and recall < 0.5


@pytest.mark.numeric
def test_precision_recall_batches_agree_with_a_dense_computation(monkeypatch):
    import aligntok.eval.metrics as m
    real, fake = rng(1).normal(size=(150, 5)), rng(2).normal(0.5, 1.0, size=(120, 5))
    dense = precision_recall(real, fake)
    d_ff = ((fake[:, None] - fake[None]) ** 2).sum(-1)
    d_rr = ((real[:, None] - real[None]) ** 2).sum(-1)
    d_fr = ((fake[:, None] - real[None]) ** 2).sum(-1)
    r_real, r_fake = np.sort(d_rr, 1)[:, 3], np.sort(d_ff, 1)[:, 3]
    # Precision and recall count points inside radii, so they are exact whenever no distance lies within
    # rounding (float64, ~1e-15 relative, whatever the blocking or BLAS kernel) of a radius. On this data the
    # nearest such tie is 3.3e-4 relative away (measured), so exact equality below is justified:
    margin = min((np.abs(d_fr - r_real[None]) / r_real[None]).min(), (np.abs(d_fr.T - r_fake[None]) / r_fake[None]).min())
    assert margin > 1e-9, margin
    monkeypatch.setattr(m, "ROW_BATCH", 7)
    assert precision_recall(real, fake) == dense
    assert dense[0] == (d_fr <= r_real[None]).any(1).mean()
    assert dense[1] == (d_fr.T <= r_fake[None]).any(1).mean()


@pytest.mark.numeric
def test_inception_score_known_values():
    classes, splits = 10, 5
    onehot = np.full((1000, classes), -1e4)
    onehot[np.arange(1000), np.arange(1000) % classes] = 0.0
    mean, std = inception_score(onehot, splits=splits)
    # exp(-1e4) underflows to exactly 0 in float64, so p(y|x) is exactly one-hot and p(y) uniform: the only
    # rounding is in log/exp of 1/classes (~1e-16 relative)
    assert mean == pytest.approx(classes, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    same = np.zeros((100, classes))
    same[:, 3] = 50.0
    # identical rows: p(y|x) == p(y), KL is 0 up to float64 rounding of the sums
    assert inception_score(same, splits=1)[0] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(MetricError):
        inception_score(same, splits=101)


@pytest.mark.numeric
def test_a_fake_exactly_on_a_real_ball_boundary_is_inside():
    # 1-D, k=3. Real 0's 3rd neighbour is 0.8, so its ball has squared radius 0.8*0.8; the fake at -0.8 is at the
    # same squared distance, computed by the same float64 operations (0.64 + 0 - 2*0), so the two are equal.
    # Inside, as in the ADM evaluator and Kynkaenniemi et al. (distance <= radius). No other real ball reaches it
    # (squared distances 0.81, 1.0, 2.56 vs radii 0.49, 0.36, 0.64) and the far fakes are outside everything:
    # precision 1/4. The fakes' balls reach 100+ units, so recall is 1. Storing the radius rounded to float32
    # (0.63999999 < 0.64000000000000001) would also leave the fake outside.
    real, fake = np.array([[0.0], [0.1], [0.2], [0.8]]), np.array([[-0.8], [100.0], [101.0], [102.0]])
    assert precision_recall(real, fake) == (0.25, 1.0)


@pytest.mark.numeric
def test_precision_recall_of_float32_features_is_computed_in_float64():
    # k=3 balls of the reals 0, .01, .02, .03 have radius .03 (ends) or .02 (middle); the fake at .015 is inside,
    # the one at .075 is .045 from the nearest real, outside by .015, and the rest are far: precision 1/4; the fake
    # balls reach past every real: recall 1. Shifted by 1000 and given as float32 (inputs rounded by <= 3e-5),
    # float64 distances of ~1e6-sized squares are good to ~1e-9, far inside those margins; squares computed in
    # float32 would be off by ~0.1, far more than every distance here.
    real = np.array([[0.0], [0.01], [0.02], [0.03]]) + 1000.0
    fake = np.array([[0.015], [0.075], [0.2], [0.3]]) + 1000.0
    assert precision_recall(real.astype(np.float32), fake.astype(np.float32)) == (0.25, 1.0)


def test_precision_recall_runs_on_the_requested_device(monkeypatch):
    import aligntok.eval.metrics as m
    seen = []
    monkeypatch.setattr(m, "_coverage", lambda q, s, r: seen.append({t.device.type for t in (q, s, r)}) or 0.0)
    # "meta" tensors have shapes and dtypes but no data (the counts cannot be read back, hence the stub):
    # a stand-in for a GPU on a CPU-only machine. The features and the k-NN radii must all live there.
    precision_recall(rng().normal(size=(8, 2)), rng(1).normal(size=(8, 2)), device="meta")
    assert seen == [{"meta"}, {"meta"}]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.numeric
def test_precision_recall_on_cuda_equals_cpu(monkeypatch):
    import aligntok.eval.metrics as m
    real, fake = rng(1).normal(size=(300, 5)), rng(2).normal(0.5, 1.0, size=(260, 5))
    cpu = precision_recall(real, fake)
    # small blocks: the k+1 smallest distances are carried across column blocks, so they must stay sorted
    monkeypatch.setattr(m, "ROW_BATCH", 64)
    monkeypatch.setattr(m, "COL_BATCH", 37)
    # counts of points inside radii: float64 on either device differs by ~1e-15 relative, far below the distance
    # gaps of this data (the dense test above measures such a margin at ~1e-4), so the counts are equal
    assert precision_recall(real, fake, device="cuda") == cpu


@pytest.mark.parametrize("real,fake", [
    (np.zeros(10), np.zeros((10, 3))), (np.zeros((10, 3)), np.zeros(10)), (np.zeros((10, 3)), np.zeros((10, 4))),
    (np.zeros((3, 2)), np.zeros((10, 2))), (np.zeros((10, 2)), np.zeros((3, 2))),
    (np.full((10, 2), np.nan), np.zeros((10, 2))), (np.zeros((10, 2)), np.full((10, 2), np.inf))])
def test_precision_recall_refuses_bad_features(real, fake):
    with pytest.raises(MetricError):  # k=3 needs more than 3 points per set
        precision_recall(real, fake)


def _two_mirrored_is() -> float:
    """IS of the logits [[0, 1], [1, 0]] by hand: p(y|x) = (a, 1-a) and (1-a, a) with a = 1/(1+e), p(y) = (1/2, 1/2),
    and both rows have KL = a log(2a) + (1-a) log(2(1-a)) to p(y); IS = exp(KL)."""
    a = 1.0 / (1.0 + np.e)
    return float(np.exp(a * np.log(2 * a) + (1 - a) * np.log(2 * (1 - a))))


@pytest.mark.numeric
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, np.int64])
@pytest.mark.parametrize("offsets", [(0, 0), (1000, -1000)])
def test_inception_score_of_soft_predictions_matches_the_closed_form(dtype, offsets):
    # integer logits (and row offsets of +-1000) are exact in every dtype here, and softmax ignores a row's offset:
    # computed in float64 after subtracting each row's max, the result is the closed form up to a few ulps of
    # exp/log (1e-12 relative is ~1e4 ulps). A float16/float32 computation is off by ~1e-4/1e-7; an offset that
    # is not each row's own max overflows exp (+1000) or underflows a whole row to 0 (-1000) and gives NaN.
    logits = (np.array([[0, 1], [1, 0]]) + np.array(offsets)[:, None]).astype(dtype)
    mean, std = inception_score(logits, splits=1)
    assert mean == pytest.approx(_two_mirrored_is(), rel=1e-12) and std == 0.0


@pytest.mark.numeric
def test_inception_score_ignores_a_class_no_sample_predicts():
    # exp(-1e4) underflows to exactly 0: the third class has p(y|x) = p(y) = 0 everywhere and contributes
    # 0 * log(0/0) := 0, so the score is the two-class closed form (same 1e-12 margin as above)
    logits = np.array([[0.0, 1.0, -1e4], [1.0, 0.0, -1e4]])
    assert inception_score(logits, splits=1)[0] == pytest.approx(_two_mirrored_is(), rel=1e-12)


@pytest.mark.numeric
def test_inception_score_default_is_ten_splits():
    # 20 one-hot rows in pairs (2i, 2i+1) predicting two different classes: each of ten splits of two rows has
    # p(y) = (1/2, 1/2) on its two classes and KL = log 2 per row, so every split scores exactly 2 (up to the
    # rounding of exp(log 2), ~1e-16). Eleven splits would leave two single-row splits scoring 1: mean 20/11.
    logits = np.full((20, 20), -1e4)
    logits[np.arange(20), (np.arange(20) + 5 * (np.arange(20) % 2)) % 20] = 0.0
    mean, std = inception_score(logits)
    assert mean == pytest.approx(2.0, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.numeric
def test_inception_score_of_single_sample_splits_is_one():
    # a split of one sample has p(y) == p(y|x): KL is 0 up to the exp/log round trip (~1e-16 per term)
    logits = rng(1).normal(size=(4, 6)) * 3
    assert inception_score(logits[:1], splits=1) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert inception_score(logits, splits=4) == pytest.approx((1.0, 0.0), abs=1e-12)


@pytest.mark.parametrize("logits,splits", [
    (np.zeros(10), 1), (np.zeros((2, 3, 4)), 1), (np.zeros((0, 10)), 1),
    (np.array([[0.0, np.nan]] * 3), 1), (np.array([[0.0, np.inf]] * 3), 1), (np.array([[0.0, -np.inf]] * 3), 1),
    (np.zeros((3, 10)), 0), (np.zeros((3, 10)), 4)])
def test_inception_score_refuses_bad_logits_and_splits(logits, splits):
    with pytest.raises(MetricError):
        inception_score(logits, splits=splits)


def test_stats_round_trip_and_adm_reference_batch(tmp_path):
    mu, s = feature_stats(rng().normal(size=(50, 3)))
    meta = {"backbone": "efficientnet-lite0", "data_hash": "abc", "count": 50}
    save_stats(tmp_path / "ref.npz", mu, s, meta)
    mu2, s2, meta2 = load_stats(tmp_path / "ref.npz")
    assert np.array_equal(mu, mu2) and np.array_equal(s, s2) and meta2 == meta  # float64 stored as is: exact
    save_stats(tmp_path / "ref2.npz", mu, s, dict(reversed(meta.items())))
    save_stats(tmp_path / "ref32.npz", mu.astype(np.float32), s.astype(np.float32), meta)
    assert all(a.dtype == np.float64 for a in load_stats(tmp_path / "ref32.npz")[:2])  # stored and read as float64
    with np.load(tmp_path / "ref.npz") as f, np.load(tmp_path / "ref2.npz") as f2:
        assert f["meta"].tobytes() == f2["meta"].tobytes()  # canonical JSON: stored meta is the same in any key order
    with pytest.raises(MetricError, match="data_hash"):
        save_stats(tmp_path / "x.npz", mu, s, {"backbone": "inception"})
    bad = tmp_path / "broken.npz"
    with pytest.raises(MetricError, match=f"^{re.escape(str(bad))}: statistics contain NaN"):  # names the file
        save_stats(bad, np.array([np.nan, 0.0, 0.0]), s, meta)
    assert not bad.exists()
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu, sigma=s)
    _, _, adm_meta = load_stats(tmp_path / "adm.npz")
    assert adm_meta == {"backbone": "inception", "source": "adm-reference-batch", "name": "adm.npz"}
    assert load_npz_samples(tmp_path / "adm.npz")[0].shape == (2, 8, 8, 3)


def test_unreadable_or_broken_stats_files_are_refused_naming_the_file(tmp_path):
    np.savez(tmp_path / "only_mu.npz", mu=np.zeros(2))
    np.savez(tmp_path / "pickled.npz", mu=np.array([0.0, 1.0], dtype=object), sigma=np.eye(2))
    np.savez(tmp_path / "nan.npz", mu=np.array([0.0, np.nan]), sigma=np.eye(2))
    for name, why in [("only_mu", "expected arrays 'mu' and 'sigma'"), ("nan", "statistics contain NaN"),
                      ("pickled", r"not a readable stats \.npz")]:  # never unpickled: allow_pickle=False
        path = tmp_path / f"{name}.npz"
        with pytest.raises(MetricError, match=f"^{re.escape(str(path))}: {why}"):
            load_stats(path)


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


@pytest.mark.numeric
def test_inception_from_local_torchscript_gives_bias_free_logits(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fake_net = FakeFidInception()
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(fake_net), str(path))
    ex = build_feature_extractor("inception", str(path))
    imgs = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats, logits = ex(imgs)
    assert ex.name == "inception" and feats.shape == (4, 2048) and logits.shape == (4, 1008)
    probs = ex.net(imgs, no_output_bias=True).double()
    # the extractor's float64 logits vs the script's float32 linear + softmax over K=2048: ~1e-6 relative on
    # probabilities of ~1e-3 (measured <= 6.4e-10 absolute); with the output bias (std ~0.01) left in, they
    # would differ by ~1e-2 relative
    assert_close(torch.softmax(logits, 1), probs, rtol=2e-5, atol=1e-9)
    with_bias = ex.net(imgs).double()
    assert ((with_bias - probs).abs() / probs).max() > 1e-3


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


@pytest.fixture(scope="module")
def lite0_112():
    return build_feature_extractor("efficientnet-lite0", feature_dim=112)


@pytest.mark.numeric
def test_efficientnet_features_do_not_depend_on_the_batching(lite0_112):
    ex = lite0_112
    assert ex.name == "efficientnet-lite0" and ex.dim == 112
    structured = shapes(12, 0)
    fa, la = extract(ex, structured, batch_size=12)
    fa2, la2 = extract(ex, [nhwc_to_nchw(structured[:5]), structured[5:12]])
    assert fa.shape == (12, 112) and la.shape == (12, 1000) and fa.dtype == np.float64
    # Batch 12 vs batches of 5 and 7 through ~20 fp32 conv layers: the GEMM blocking, and so the summation
    # order, follows the batch shape, the thread count and the ATen kernel. Features reach ~13 and logits ~7;
    # measured <= 1.4e-6 apart under ATEN_CPU_CAPABILITY=default/avx2 and one thread (4.1e-6 for a batch of 32
    # at one thread). atol 1e-4 is ~1e-5 of the feature scale (>20x margin); the images differ by O(1).
    np.testing.assert_allclose(fa2, fa, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(la2, la, rtol=1e-5, atol=1e-4)


def test_efficientnet_features_separate_noise_from_structure(lite0_112):
    structured = shapes(64, 0)
    noise = rng(2).integers(0, 256, (32, 64, 64, 3), dtype=np.uint8)
    fa, _ = extract(lite0_112, structured[:32])
    fb, _ = extract(lite0_112, structured[32:])
    fn, _ = extract(lite0_112, noise)
    halves = frechet_distance(*feature_stats(fa), *feature_stats(fb))
    far = frechet_distance(*feature_stats(fa), *feature_stats(fn))
    assert far > 5 * halves, (far, halves)  # measured 734 vs 16.9 (43x) under default/avx2 kernels and one thread


@pytest.mark.numeric
def test_efficientnet_default_is_the_1280d_head_with_imagenet_classifier():
    ex = build_feature_extractor("efficientnet-lite0")
    feats, logits = ex(nhwc_to_nchw(shapes(3, size=256)))
    assert ex.dim == 1280 and feats.shape == (3, 1280) and logits.shape == (3, 1000)
    # float32 -> float64 -> float32 is lossless, and this is the same Linear on the same 3 rows in the same
    # process as inside the extractor: bit-identical by construction
    assert torch.equal(logits, ex.net.classifier(feats.float()).double())
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


@pytest.mark.numeric
def test_psnr_ssim_known_values():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert torch.isinf(psnr(x, x)).all()
    x0 = torch.zeros(1, 3, 16, 16)
    # 0.2 in [-1, 1] is 0.1 in [0, 1]: PSNR = 10 log10(1 / 0.01) = 20 dB; 0.2 is not exact in fp32 (~1e-8
    # relative), which moves the PSNR by ~1e-7 dB
    assert psnr(x0 + 0.2, x0).item() == pytest.approx(20.0, abs=1e-5)
    # identical inputs: numerator and denominator are the same float64 expression; 1e-6 covers the fp32 cast
    assert_close(ssim(x, x), torch.ones(2), rtol=0, atol=1e-6)
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    # torchmetrics averages its reflect-padded full map; Wang et al. (and skimage) average valid windows only.
    # Ours runs in float64, torchmetrics in float32 (121-tap blurs, variance as E[x^2] - mu^2): measured
    # <= 2.4e-7 apart on SSIM ~0.89; 2e-6 is ~30 fp32 ulp
    _, full = structural_similarity_index_measure((y + 1) / 2, (x + 1) / 2, data_range=1.0, reduction="none",
                                                  return_full_image=True)
    ref = full[..., 5:-5, 5:-5].flatten(1).mean(1)
    assert_close(ssim(y, x), ref, rtol=0, atol=2e-6)
    assert (ssim(y, x) < 0.95).all()  # measured 0.89
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
