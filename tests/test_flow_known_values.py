"""Flow matching, the ODE sampler, sampling de-normalisation and the semantic cosine against values derived by
hand (tiny deterministic models and inputs). Complements test_diffusion.py, which checks statistical behaviour."""
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from aligntok.config import SampleConfig
from aligntok.diffusion.flow import T_EPS, FlowMatching, sample_timesteps, shift_timesteps
from aligntok.diffusion.sampler import cfg_active, combine_cfg, sample, time_grid
from aligntok.eval.reconstruction import reconstruction_metrics
from aligntok.generate import Generator

pytestmark = pytest.mark.numeric

# a seed whose three t (both kinds) lie in [0.05, 0.95] and >= 0.1 away from 0.5 (asserted where it matters)
SEED = 15
X1 = 3.0 + torch.arange(48, dtype=torch.float32).view(3, 4, 2, 2) / 16  # data in [3, 6): far from the N(0, 1) noise


def hand_draws(kind, seed, shape):
    """What FlowMatching.loss draws from a generator seeded `seed`: t first (sample_timesteps, mean 0, std 1),
    then x0 = randn(x1.shape). Sigmoid in float64 from the same normal draws."""
    g = torch.Generator().manual_seed(seed)
    if kind == "lognormal":
        t = 1 / (1 + torch.exp(-torch.randn(shape[0], generator=g).double()))
    else:
        t = torch.rand(shape[0], generator=g).double()
    return t.clamp(T_EPS, 1 - T_EPS), torch.randn(shape, generator=g).double()


class Recorder:
    """Records (xt, t, y) and returns `fn(xt, t, y)`."""
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, xt, t, y):
        self.calls.append((xt.clone(), t.clone(), y.clone()))
        return self.fn(xt, t, y)


@pytest.mark.parametrize("kind", ["lognormal", "uniform"])
def test_loss_feeds_the_model_the_linear_path_at_t(kind):
    t, x0 = hand_draws(kind, SEED, X1.shape)
    # the check below only discriminates t from 1 - t (and x1 from x0 weights) if no t sits near 0.5
    assert (2 * t - 1).abs().min() > 0.2, t
    model = Recorder(lambda xt, tt, y: torch.zeros_like(xt))
    y = torch.tensor([0, 2, 1])
    FlowMatching(timestep_sampling=kind).loss(model, X1, y, generator=torch.Generator().manual_seed(SEED))
    (xt, tt, yy), = model.calls
    # float32 sigmoid/rand vs float64: ~1e-7 absolute; 1e-6 leaves margin, t vs 1 - t differs by > 0.2 here
    assert_close(tt.double(), t, rtol=0, atol=1e-6)
    # float32 interpolation of values <= 6 vs float64: ~1e-6 absolute; 1e-5 leaves margin. A swapped
    # interpolation moves xt by |1 - 2t| |x1 - x0| >= 0.2 * ~1 = O(0.1..1)
    assert_close(xt.double(), t.view(-1, 1, 1, 1) * X1.double() + (1 - t.view(-1, 1, 1, 1)) * x0, rtol=0, atol=1e-5)
    assert torch.equal(yy, y)


def test_velocity_oracle_from_xt_has_zero_loss_and_its_negation_the_known_maximum():
    """v = (x1 - xt) / (1 - t) equals x1 - x0 exactly when xt = t x1 + (1 - t) x0: no RNG replication needed."""
    def oracle(xt, t, y=None):
        return (X1 - xt) / (1 - t.view(-1, 1, 1, 1))
    fm = FlowMatching()
    g = torch.Generator().manual_seed(SEED)
    loss, logs = fm.loss(Recorder(oracle), X1, torch.zeros(3, dtype=torch.long), generator=g)
    t = hand_draws("lognormal", SEED, X1.shape)[0]
    assert t.max() < 0.95 and (2 * t - 1).abs().min() > 0.2  # 1/(1 - t) amplifies rounding by <= 20x
    # float32 rounding ~1e-6 relative in x1 - xt, times <= 20: errors in v ~1e-4, squared ~1e-8 -> 1e-6 margin.
    # A swapped path / 1 - t fed / sign-flipped target gives O(1) errors in v, so loss O(1)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert logs["mse"] == pytest.approx(0.0, abs=1e-6) and logs["cos_loss"] == pytest.approx(0.0, abs=1e-6)
    # -v: mse = mean((2 (x1 - x0))^2) = 4 mean((x1 - x0)^2), cos = -1 everywhere so 1 - cos = 2
    _, x0 = hand_draws("lognormal", SEED, X1.shape)
    neg_loss, neg_logs = fm.loss(Recorder(lambda xt, tt, y: -oracle(xt, tt)), X1, torch.zeros(3, dtype=torch.long),
                                 generator=torch.Generator().manual_seed(SEED))
    mse = 4 * (X1.double() - x0).pow(2).mean().item()
    # float32 sums of 48 terms vs float64 plus the 1e-4 oracle error above: 1e-4 relative leaves margin
    assert neg_logs["mse"] == pytest.approx(mse, rel=1e-4)
    assert neg_logs["cos_loss"] == pytest.approx(2.0, abs=1e-5)
    assert neg_loss.item() == pytest.approx(mse + 2.0, rel=1e-4)


@pytest.mark.parametrize("use_cosine,weight", [(True, 1.0), (True, 0.5), (True, 2.5), (False, 2.5)])
def test_loss_value_is_mse_plus_weighted_channel_cosine(use_cosine, weight):
    pred = torch.randn(X1.shape, generator=torch.Generator().manual_seed(11))  # a fixed, unrelated prediction
    fm = FlowMatching(use_cosine_loss=use_cosine, cosine_weight=weight)
    loss, logs = fm.loss(Recorder(lambda xt, t, y: pred), X1, torch.zeros(3, dtype=torch.long),
                         generator=torch.Generator().manual_seed(5))
    _, x0 = hand_draws("lognormal", 5, X1.shape)
    p, target = pred.double(), X1.double() - x0  # velocity target x1 - x0
    mse = (p - target).pow(2).mean().item()
    cos = (p * target).sum(1) / (p.norm(dim=1) * target.norm(dim=1))  # over channels, per (sample, position)
    cos_loss = (1 - cos).mean().item()
    assert 0.3 < cos_loss < 1.7  # a random prediction: the cosine term is O(1), so dropping it is visible
    expected = mse + weight * cos_loss if use_cosine else mse
    # float32 reductions over 48 values vs float64: ~1e-6 relative; 1e-5 leaves margin. Dropping the cosine
    # term or its weight moves the loss by >= 0.5 * 0.3, a sign flip of the target by far more
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert logs["mse"] == pytest.approx(mse, rel=1e-5)
    if use_cosine:
        assert logs["cos_loss"] == pytest.approx(cos_loss, rel=1e-5)
    else:
        assert "cos_loss" not in logs


def test_timestep_sampling_values_and_clamp():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(6, generator=g).double()
    t = sample_timesteps(6, kind="lognormal", mean=0.5, std=2.0, generator=torch.Generator().manual_seed(0))
    # float32 sigmoid vs float64: ~1e-7 absolute; 1e-6 leaves margin. Ignoring mean/std moves t by O(0.1)
    assert_close(t.double(), 1 / (1 + torch.exp(-(u * 2.0 + 0.5))), rtol=0, atol=1e-6)
    r = torch.rand(6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_timesteps(6, kind="uniform", generator=torch.Generator().manual_seed(1)), r)
    # sigmoid(+-40) saturates (float32 1.0 / 4e-18): clamped to [T_EPS, 1 - T_EPS], as float32 numbers
    hi = sample_timesteps(4, mean=40.0, std=1.0, generator=torch.Generator().manual_seed(0))
    lo = sample_timesteps(4, mean=-40.0, std=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(hi, torch.full((4,), 1 - 1e-6)) and torch.equal(lo, torch.full((4,), 1e-6))
    with pytest.raises(ValueError, match="lognormal"):
        sample_timesteps(2, kind="beta")


def test_shift_timesteps_at_chosen_points():
    t = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    # s t / (1 + (s - 1) t): s=3, t=.25 -> .75/1.5 = .5; s=3, t=.5 -> 1.5/2 = .75; s=3, t=.75 -> 2.25/2.5 = .9
    # s=.5: .125/.875 = 1/7, .25/.75 = 1/3, .375/.625 = .6. float64 elementwise: a few ulp, 1e-12 leaves margin
    assert shift_timesteps(t, 3.0).tolist() == pytest.approx([0.5, 0.75, 0.9], rel=1e-12)
    assert shift_timesteps(t, 0.5).tolist() == pytest.approx([1 / 7, 1 / 3, 0.6], rel=1e-12)
    assert shift_timesteps(t, 1.0).tolist() == pytest.approx([0.25, 0.5, 0.75], rel=1e-12)  # s=1: identity
    assert torch.equal(shift_timesteps(t, -2.0), t)  # s <= 0: no shift


def test_combine_cfg_values_and_channels():
    cond = torch.tensor([1.0, 2.0, -1.0, 4.0]).view(1, 4, 1, 1)
    uncond = torch.tensor([0.0, 3.0, 1.0, -2.0]).view(1, 4, 1, 1)
    # uncond + 2.5 (cond - uncond): 0 + 2.5 = 2.5; 3 - 2.5 = .5; 1 - 5 = -4; -2 + 15 = 13 (dyadic: exact)
    assert combine_cfg(cond, uncond, 2.5, None).flatten().tolist() == [2.5, 0.5, -4.0, 13.0]
    assert combine_cfg(cond, uncond, 2.5, 3).flatten().tolist() == [2.5, 0.5, -4.0, 4.0]  # 4th channel: cond
    assert combine_cfg(cond, uncond, 2.5, 1).flatten().tolist() == [2.5, 2.0, -1.0, 4.0]


def test_cfg_active_boundaries():
    assert [cfg_active(t, 3.0, 0.3) for t in (0.0, 0.29, 0.3, 0.99, 1.0)] == [False, False, True, True, False]
    assert not any(cfg_active(t, 1.0, 0.0) for t in (0.0, 0.5, 0.99))  # scale 1: never guided
    assert cfg_active(0.0, 1.5, 0.0)


V_LABEL = torch.tensor([1.0, -2.0, 0.5])  # velocity per label 0, 1, and null (2): constant in x and t


@pytest.mark.parametrize("method,shift,n_guided,expected", [
    # grid 0, .25, .5, .75, 1; start .5. guided g = v_null + 3 (v_c - v_null): label 0 -> 2, label 1 -> -7.
    # Euler evaluates at 0, .25 (cond) and .5, .75 (guided): x = .5 v_c + .5 g -> 1.5, -4.5
    ("euler", 0.0, 2, [1.5, -4.5]),
    # Heun pairs (0,.25) (.25,.5) (.5,.75) (.75,1): guided at .5, .5, .75, .75 (t = 1 is not):
    # .125 (2 v_c) + .125 (v_c + g) + .125 (2 g) + .125 (g + v_c) = .5 v_c + .5 g -> 1.5, -4.5
    ("heun", 0.0, 4, [1.5, -4.5]),
    # shift .5: grid 0, 1/7, 1/3, .6, 1; only t = .6 is guided: x = .6 v_c + .4 g -> 1.4, -4.0
    ("euler", 0.5, 1, [1.4, -4.0]),
])
def test_guidance_interval_in_sample(method, shift, n_guided, expected):
    model = Recorder(lambda x, t, labels: V_LABEL[labels].view(-1, 1, 1, 1).expand_as(x).clone())
    y = torch.tensor([0, 1])
    out = sample(model, torch.zeros(2, 3, 1, 1), y, steps=4, method=method, cfg_scale=3.0,
                 cfg_interval_start=0.5, timestep_shift=shift, null_class=2)
    guided = [c for c in model.calls if (c[2] == 2).any()]
    assert len(model.calls) == 4 * (2 if method == "heun" else 1) and len(guided) == n_guided
    for _, t, labels in guided:  # cond and null halves of one batch, at a time inside the interval
        assert labels.tolist() == [0, 1, 2, 2] and 0.5 <= t[0].item() < 1
    # float32 sums of a few O(1) terms: ~1e-6 absolute; 1e-5 leaves margin, a wrong interval moves it by >= 0.4
    assert_close(out, torch.tensor(expected).view(2, 1, 1, 1).expand(2, 3, 1, 1), rtol=0, atol=1e-5)


def linear_velocity(a, b):
    return lambda x, t, y: a * x + b * t.view(-1, *([1] * (x.dim() - 1)))


def test_euler_and_heun_two_steps_by_hand():
    # v = -x + 2t, x(0) = 1, h = .5 (grid 0, .5, 1)
    # Euler: x1 = 1 + .5 (-1 + 0) = .5; x2 = .5 + .5 (-.5 + 1) = .75
    # Heun step 1: d0 = -1, predictor .5, d1 = -.5 + 1 = .5, x = 1 + .25 (-1 + .5) = .875
    # Heun step 2: d0 = -.875 + 1 = .125, predictor .875 + .0625 = .9375, d1 = -.9375 + 2 = 1.0625,
    #              x = .875 + .25 (.125 + 1.0625) = 1.171875
    # every intermediate is a short binary fraction, so float32 is exact
    x = torch.ones(1, 1)
    y = torch.zeros(1, dtype=torch.long)
    assert sample(linear_velocity(-1.0, 2.0), x, y, steps=2, method="euler").item() == 0.75
    assert sample(linear_velocity(-1.0, 2.0), x, y, steps=2, method="heun").item() == 1.171875


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_linear_model_steps_on_a_shifted_grid(method):
    a, b, steps, shift = -1.3, 0.7, 5, 0.4
    grid = [shift * (k / steps) / (1 + (shift - 1) * (k / steps)) for k in range(steps + 1)]
    x0 = [-2.0, -0.5, 0.0, 1.25, 3.0]
    expected = []
    for x in x0:  # scalar float64 recurrence
        for t0, t1 in zip(grid[:-1], grid[1:]):
            h, d0 = t1 - t0, a * x + b * t0
            x = x + 0.5 * h * (d0 + a * (x + h * d0) + b * t1) if method == "heun" else x + h * d0
        expected.append(x)
    noise = torch.tensor(x0, dtype=torch.float64).view(5, 1)
    out = sample(linear_velocity(a, b), noise, torch.zeros(5, dtype=torch.long), steps=steps, method=method,
                 timestep_shift=shift)
    # float64 in the sampler too, same op order: a few ulp; 1e-12 leaves margin. An unshifted grid, a missing
    # b t term or a corrector at the wrong t changes it at O(h), far above 1e-12
    assert out.flatten().tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


class ZeroDit(torch.nn.Module):
    def forward(self, x, t, y):
        return torch.zeros_like(x)


class IdentityTokenizer(torch.nn.Module):
    def decode(self, z):
        return z


def test_generator_latents_are_denormalised_noise():
    mean, std = [3.0, -1.0], [2.0, 0.5]
    config = {"in_channels": 2, "input_size": 3, "num_classes": 4, "latent_stats": {"mean": mean, "std": std}}
    gen = Generator(ZeroDit(), config, IdentityTokenizer(), torch.device("cpu"))
    indices, cfg = [4, 1], SampleConfig(steps=3, seed=7)
    z = gen.latents(torch.tensor([0, 3]), indices, cfg)
    # zero velocity: the sample is the noise, seeded per index as seed * 1_000_003 + i
    noise = torch.stack([torch.randn((2, 3, 3), generator=torch.Generator().manual_seed(7 * 1_000_003 + i))
                         for i in indices]).double()
    expected = torch.stack([noise[:, 0] * 2.0 + 3.0, noise[:, 1] * 0.5 - 1.0], dim=1)
    # float32 multiply-add vs float64: ~1e-6 absolute for values ~10; 1e-5 leaves margin. Skipping the
    # de-normalisation moves channel 0 by ~3 (its mean)
    assert_close(z.double(), expected, rtol=0, atol=1e-5)
    assert (z.double() - noise).abs().amax(dim=(0, 2, 3)).min() > 0.5  # really not the raw noise
    assert_close(gen.images(torch.tensor([0, 3]), indices, cfg).double(), expected.clamp(-1, 1), rtol=0, atol=1e-5)


# semantic cosine: latents 2 channels x 1 x 4 tokens; reference tokens (1,0) (0,1) (1,1) (2,-1)
Z_REF = torch.tensor([[1.0, 0.0, 1.0, 2.0], [0.0, 1.0, 1.0, -1.0]]).view(2, 1, 4)
Z_CASES = {
    "same": (Z_REF, 1.0),
    "scaled": (3 * Z_REF, 1.0),  # cosine, not a dot product
    "orthogonal": (torch.stack([-Z_REF[1], Z_REF[0]]), 0.0),  # each token rotated 90 degrees
    "negated": (-Z_REF, -1.0),
    # tokens (1,0) (1,0) (-1,-1) (1,0): cosines 1, 0, -1, 2/sqrt(5) -> mean (2/sqrt(5)) / 4
    "mixed": (torch.tensor([[1.0, 1.0, -1.0, 1.0], [0.0, 0.0, -1.0, 0.0]]).view(2, 1, 4), 0.5 / math.sqrt(5)),
}


class TableTokenizer(torch.nn.Module):
    """encode: image k (filled with k / 10) -> latents[k]; decode: zeros of the image shape."""
    def __init__(self, latents):
        super().__init__()
        self.latents = latents

    def encode(self, x):
        return self.latents[(x[:, 0, 0, 0] * 10).round().long()]

    def decode(self, z):
        return torch.zeros(z.shape[0], 3, 2, 8)


def semantic_cosine(cases, batch_size=16):
    dataset = [(torch.full((3, 2, 8), k / 10), 0) for k in range(len(cases))]
    model = TableTokenizer(torch.stack([Z_CASES[c][0] for c in cases]))
    reference = TableTokenizer(Z_REF.expand(len(cases), 2, 1, 4))
    return reconstruction_metrics(model, dataset, num_images=len(cases), device=torch.device("cpu"),
                                  reference=reference, batch_size=batch_size)["semantic_cosine"]


@pytest.mark.parametrize("case", list(Z_CASES))
def test_semantic_cosine_known_cases(case):
    # float32 cosine of O(1) vectors: ~1e-7; 1e-6 leaves margin. A cosine over the token axis instead of the
    # channels, or a dot product, changes the "mixed"/"scaled" answers by O(0.1..1)
    assert semantic_cosine([case]) == pytest.approx(Z_CASES[case][1], abs=1e-6)


def test_semantic_cosine_is_the_mean_over_images_across_batches():
    cases = list(Z_CASES)
    # per-image means 1, 1, 0, -1, .2236: averaged over 5 images, batches of 2 (2 + 2 + 1)
    assert semantic_cosine(cases, batch_size=2) == pytest.approx((1 + 0.5 / math.sqrt(5)) / 5, abs=1e-6)
    dataset = [(torch.full((3, 2, 8), k / 10), 0) for k in range(2)]
    model = TableTokenizer(torch.stack([Z_CASES["mixed"][0], Z_CASES["negated"][0]]))
    no_ref = reconstruction_metrics(model, dataset, num_images=2, device=torch.device("cpu"))
    assert no_ref["semantic_cosine"] == pytest.approx(1.0, abs=1e-6)  # no reference: the model against itself


class RecordT(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.t = []

    def forward(self, x, t, y):
        self.t.append(t.clone())
        return x * self.w


def test_lognormal_until_switches_to_uniform_at_that_step():
    flow = FlowMatching("lognormal", lognormal_until=2)
    assert [flow.sampling_at(s) for s in (0, 1, 2, 3)] == ["lognormal", "lognormal", "uniform", "uniform"]
    assert FlowMatching("lognormal").sampling_at(10 ** 9) == "lognormal"  # null: never switches
    model, x = RecordT(), torch.zeros(4, 2, 2, 2)
    for step in range(4):
        flow.loss(model, x, torch.zeros(4, dtype=torch.long), generator=torch.Generator().manual_seed(step), step=step)
    for step, t in enumerate(model.t):  # the t of each step, by hand from the same seeded generator
        expected, _ = hand_draws("lognormal" if step < 2 else "uniform", step, x.shape)
        # float32 sigmoid against float64: ~6e-8 in (0, 1); the other distribution's draw is another number entirely
        assert_close(t.double(), expected, rtol=0, atol=1e-6)


def test_time_grid_allows_a_single_step_and_defaults_to_no_shift():
    # linspace(0, 1, steps + 1) in float64: k/4 and 0, 1 are exact binary fractions
    assert time_grid(1) == [0.0, 1.0] and time_grid(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="expected >= 1"):
        time_grid(0)
