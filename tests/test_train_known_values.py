"""Known values of the training arithmetic, each derived by hand: the lr schedule (and that the loop applies it),
EMA, gradient clipping, the reconstruction loss's weights, KL, the adaptive GAN weight, stage 2's semantic
preservation (value and where its gradient goes), and exit code 3 through the CLI when the loss turns NaN."""
import copy
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from aligntok.config import Stage2Config, TrainConfig
from aligntok.losses import ReconstructionLoss, kl_loss
from aligntok.models.tokenizer import AlignTokenizer
from aligntok.stages.tokenizer import TokenizerRecipe
from aligntok.train.dist import DistInfo
from aligntok.train.loop import EMA, lr_lambda, train, unwrap
from tests.conftest import ROOT
from tests.test_pipeline import isolated_env
from tests.test_tokenizer_stages import Images, tok_config

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
pytestmark = pytest.mark.usefixtures("one_thread")


def cosine_by_hand(step, warmup, steps):
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (steps - warmup))))


@pytest.mark.numeric
def test_lr_lambda_warmup_then_cosine_values():
    f = lr_lambda(TrainConfig(steps=10, warmup_steps=4, schedule="cosine"))
    # float64 arithmetic of a few operations: ~1e-16; a constant schedule or a missing warm-up is off by >= 0.25
    expected = {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 6: 0.75, 7: 0.5, 8: 0.25, 10: 0.0, 15: 0.0}  # cos(pi/3) = 1/2
    for step, value in expected.items():
        assert f(step) == pytest.approx(value, abs=1e-12), step
    one = lr_lambda(TrainConfig(steps=5, warmup_steps=4, schedule="cosine"))  # one step after warm-up
    assert [one(s) for s in (3, 4, 5, 6)] == [1.0, 1.0, 0.0, 0.0]  # the cosine still ends at 0 (logged at the end)
    constant = lr_lambda(TrainConfig(steps=10, warmup_steps=2, schedule="constant"))
    assert [constant(s) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]  # exact binary fractions


class LinearRecipe:
    """loss = <g_step, w> with a float64 weight vector w and plain SGD: each step moves w by exactly lr_step * the
    (clipped) g_step, so the applied lr, the clipping and the EMA are all computable by hand."""

    def __init__(self, grads, lr=0.1):
        self.net = nn.Module()
        self.net.w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        self.grads = grads  # step -> the gradient vector
        self.opt = torch.optim.SGD(self.net.parameters(), lr=lr)
        self.seen = []  # w as each step's loss saw it

    def modules(self):
        return {"net": self.net}

    def ema_modules(self):
        return {"net": self.net}

    def optimizers(self):
        return {"main": self.opt}

    def wrap(self, fn):
        pass

    def losses(self, batch, step):
        self.seen.append(self.net.w.detach().clone())
        loss = (torch.tensor(self.grads(step), dtype=torch.float64) * self.net.w).sum()
        return {"main": loss}, {"loss": float(loss.detach())}

    def preview(self, batch, step):
        return None


DATA = torch.utils.data.TensorDataset(torch.zeros(8, 1))


def run_linear(tmp_path, recipe, **cfg_kw):
    cfg = TrainConfig(**{**dict(steps=8, batch_size=2, lr=0.1, log_every=1, ckpt_every=100, grad_clip=0), **cfg_kw})
    return train(recipe, DATA, cfg, dist=CPU, ckpt_dir=tmp_path / "ckpt", config_hash="h", seed=0)


@pytest.mark.numeric
def test_loop_applies_warmup_and_cosine_lr_and_ema_each_step(tmp_path):
    steps, warmup, base, decay = 8, 3, 0.1, 0.6
    recipe = LinearRecipe(lambda step: [1.0, 1.0])
    out = run_linear(tmp_path, recipe, steps=steps, warmup_steps=warmup, schedule="cosine", ema_decay=decay)
    seen = [w[0].item() for w in recipe.seen] + [recipe.net.w[0].item()]
    lrs = [base * cosine_by_hand(k, warmup, steps) for k in range(steps)]
    # SGD on a gradient of exactly 1: step k moves w by lr_k; w is float64 near 1, so each difference is lr_k to
    # ~2e-16. A constant schedule (0.1 where warm-up gives 0.033) or a scheduler never stepped is off by >= 0.03
    for k in range(steps):
        assert seen[k] - seen[k + 1] == pytest.approx(lrs[k], abs=1e-12), k
    # the history row of step s (s updates done) reports the lr the scheduler holds then: the one of step index s
    for row in out["history"]:
        assert row["lr"] == pytest.approx(base * cosine_by_hand(row["step"], warmup, steps), abs=1e-12), row
    # EMA of the same trajectory, by hand: the shadow starts at w_0, update k (1-based) uses
    # d_k = min(decay, (1+k)/(10+k)); float64 lerp: ~1e-16 per update. An inverted weight (lerp by d instead of
    # 1-d) moves the result by 0.019 here
    shadow = seen[0]
    for k in range(1, steps + 1):
        d = min(decay, (1 + k) / (10 + k))
        shadow = d * shadow + (1 - d) * seen[k]
    assert out["ema"]["net"].w[0].item() == pytest.approx(shadow, abs=1e-12)


def test_checkpoints_and_the_ema_see_the_model_inside_a_ddp_wrapper():
    # DataParallel, like DDP, holds the model in `.module` (and on a CPU-only machine needs no GPU): a checkpoint
    # of the wrapper would prefix every key with "module." and not load into a bare model
    net = nn.Linear(2, 2)
    assert unwrap(nn.DataParallel(net)) is net and unwrap(net) is net


@pytest.mark.numeric
@pytest.mark.parametrize("warmup", [True, False])
def test_ema_shadow_after_k_updates_by_hand(warmup):
    decay, updates = 0.6, 15  # warm-up ramp (1+k)/(10+k) reaches 0.6 at k = 13: both sides of the min() are used
    net = nn.BatchNorm1d(3).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    ema = EMA({"m": net}, decay, warmup)
    shadow = [1.0, 2.0, 3.0]
    for k in range(1, updates + 1):
        target = [math.sin(k + i) for i in range(3)]  # a new value every update
        with torch.no_grad():
            net.weight.copy_(torch.tensor(target, dtype=torch.float64))
            net.running_mean.fill_(float(k))
        ema.update({"m": net})
        d = min(decay, (1 + k) / (10 + k)) if warmup else decay
        shadow = [d * s + (1 - d) * t for s, t in zip(shadow, target)]
    # float64, 15 lerps of O(1) values: ~1e-15; inverting the weight (d <-> 1-d) moves the shadow by 0.26 (decay
    # 0.6 is not 0.5, so d and 1-d differ), dropping or forcing the warm-up by 5e-3
    assert_close(ema.shadow["m"].weight, torch.tensor(shadow, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(ema.shadow["m"].running_mean, net.running_mean)  # buffers are copied, not averaged
    # the shadow is frozen: evaluating it (previews, sampling) records no autograd graph
    assert not ema.shadow["m"](torch.ones(2, 3, dtype=torch.float64)).requires_grad


@pytest.mark.numeric
def test_grad_clip_through_the_loop_logs_the_pre_clip_norm(tmp_path):
    # step 0: g = (3, 4), norm 5 > clip 1; step 1: g = (0.3, 0.4), norm 0.5 < clip: left alone
    recipe = LinearRecipe(lambda step: [3.0, 4.0] if step == 0 else [0.3, 0.4], lr=1.0)
    out = run_linear(tmp_path, recipe, steps=2, grad_clip=1.0)
    applied = [recipe.seen[0] - recipe.seen[1], recipe.seen[1] - recipe.net.w.detach()]  # lr 1: the step is g
    # clip_grad_norm_ scales by clip / (norm + 1e-6): norm 5 -> 1 - 2e-7; float64 rounding ~1e-16. An unclipped
    # step has norm 5, a doubly-scaled one 0.2
    assert applied[0].norm().item() == pytest.approx(1.0, abs=1e-6)
    assert_close(applied[0], torch.tensor([0.6, 0.8], dtype=torch.float64), rtol=0, atol=1e-6)
    assert_close(applied[1], torch.tensor([0.3, 0.4], dtype=torch.float64), rtol=0, atol=1e-12)
    # the logged grad_norm is the pre-clip norm: sqrt(9 + 16) = 5, sqrt(0.09 + 0.16) = 0.5 in float64 (~1e-16);
    # a post-clip norm would log 1.0
    norms = [row["grad_norm_main"] for row in out["history"]]
    assert norms == pytest.approx([5.0, 0.5], abs=1e-12)


@pytest.mark.numeric
def test_clip_fraction_is_the_share_of_steps_clipped_in_each_log_window(tmp_path):
    # norms by step: 5, 5 | 0.5, 5 | 0.5, 0.5 against clip 1, logged every 2 steps: fired 2/2, 1/2, 0/2
    norm5, norm_half = [3.0, 4.0], [0.3, 0.4]
    grads = {0: norm5, 1: norm5, 2: norm_half, 3: norm5, 4: norm_half, 5: norm_half}
    recipe = LinearRecipe(lambda step: grads[step], lr=1.0)
    out = run_linear(tmp_path, recipe, steps=6, grad_clip=1.0, log_every=2)
    rows = out["history"]
    # each value is a mean of two exact 0/1 flags (binary fractions, exact); a flag that tested norm < clip,
    # or logged the post-clip norm (always <= 1: never "fired"), gives another sequence
    assert [r["clip_frac_main"] for r in rows] == [1.0, 0.5, 0.0]
    # window means of the pre-clip norms, float64: sqrt(25) and sqrt(0.25) are exact, the means ~1e-16
    assert [r["grad_norm_main"] for r in rows] == pytest.approx([5.0, 2.75, 0.5], abs=1e-12)


@pytest.mark.numeric
@pytest.mark.parametrize("off", [0, None])
def test_grad_clip_off_leaves_gradients_alone_and_still_logs_the_norm(tmp_path, off):
    recipe = LinearRecipe(lambda step: [3.0, 4.0], lr=1.0)
    out = run_linear(tmp_path, recipe, steps=2, grad_clip=off)
    # lr 1 and SGD: the step is the gradient itself, (3, 4) exactly in float64; clipped at 1 it would be (0.6, 0.8)
    assert_close(recipe.seen[0] - recipe.seen[1], torch.tensor([3.0, 4.0], dtype=torch.float64), rtol=0, atol=1e-12)
    assert [r["grad_norm_main"] for r in out["history"]] == pytest.approx([5.0, 5.0], abs=1e-12)
    assert not any("clip_frac_main" in r for r in out["history"])

class SquaredDiff(nn.Module):
    """A deterministic LPIPS stand-in: per-image mean squared difference, shaped (N, 1, 1, 1) like LPIPS."""

    def forward(self, a, b):
        return ((a - b) ** 2).mean((1, 2, 3), keepdim=True)


@pytest.mark.numeric
def test_reconstruction_loss_weights_each_term():
    g = torch.Generator().manual_seed(0)
    x, x_rec = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g,
                                                                                       dtype=torch.float64)
    mean, logvar = torch.randn(2, 4, 2, 2, generator=g, dtype=torch.float64), torch.randn(2, 4, 2, 2, generator=g,
                                                                                          dtype=torch.float64)
    xn, rn, mn, lv = (t.numpy() for t in (x, x_rec, mean, logvar))
    l1, lp = np.abs(xn - rn).mean(), ((xn - rn) ** 2).mean()  # equal-sized images: the mean of per-image means
    kl = (0.5 * (mn ** 2 + np.exp(lv) - 1 - lv)).reshape(2, -1).sum(1).mean()
    fn = ReconstructionLoss(SquaredDiff(), l1_weight=3.0, lpips_weight=5.0, kl_weight=7.0, discriminator=None)
    loss, logs = fn.generator_loss(x, x_rec, mean, logvar, None, step=0)
    # float64 on both sides, ~100 terms: ~1e-15 relative. The three terms are ~0.9, ~1.6 and ~8, so dropping,
    # swapping or rescaling any weight moves the total by > 0.5
    assert loss.item() == pytest.approx(3 * l1 + 5 * lp + 7 * kl, rel=1e-12)
    assert logs["nll"] == pytest.approx(3 * l1 + 5 * lp, rel=1e-12)
    assert [logs["l1"], logs["lpips"], logs["kl"]] == pytest.approx([l1, lp, kl], rel=1e-12)
    off = ReconstructionLoss(SquaredDiff(), l1_weight=3.0, lpips_weight=0.0, kl_weight=0.0, discriminator=None)
    off_loss, off_logs = off.generator_loss(x, x_rec, mean, logvar, None, step=0)
    assert off_loss.item() == pytest.approx(3 * l1, rel=1e-12)
    assert set(off_logs) == {"l1", "nll"}  # a weight of 0 switches the term off: not computed, not logged
    small = ReconstructionLoss(SquaredDiff(), l1_weight=3.0, lpips_weight=5.0, kl_weight=0.5, discriminator=None)
    assert small.generator_loss(x, x_rec, mean, logvar, None, step=0)[0].item() == pytest.approx(
        3 * l1 + 5 * lp + 0.5 * kl, rel=1e-12)  # KL weights below 1 (the usual 1e-6 scale) apply too


def test_adaptive_gan_weight_is_zero_without_gradients_to_balance():
    fn = ReconstructionLoss(None, disc_weight=0.5)
    W = nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    nll, g = (2 * W).sum(), (3 * W).sum()
    with torch.no_grad():  # evaluation, even with a graph at hand
        w = fn.adaptive_weight(nll, g, W)
    assert w.shape == () and w.item() == 0.0
    w = fn.adaptive_weight(nll, g, torch.ones(2, 2, dtype=torch.float64))  # a frozen last layer
    assert w.shape == () and w.item() == 0.0


def test_discriminator_loss_logs_its_hinge_loss_and_mean_logits():
    class Disc(nn.Module):  # logits = the image itself
        def forward(self, img):
            return img
    fn = ReconstructionLoss(None, disc_start=0, discriminator=Disc())
    x, x_rec = torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), -0.25)
    d, logs = fn.discriminator_loss(x, x_rec, step=0)
    # hinge by hand: (mean relu(1 - 0.5) + mean relu(1 - 0.25)) / 2 = (0.5 + 0.75) / 2; binary fractions: exact
    assert logs == {"d_loss": 0.625, "logits_real": 0.5, "logits_fake": -0.25} and d.item() == 0.625
    off = ReconstructionLoss(None, disc_weight=0.0, disc_start=0, discriminator=Disc())
    assert off.discriminator_loss(x, x_rec, step=0) == (None, {})  # a GAN weight of 0 trains no discriminator


@pytest.mark.numeric
def test_kl_loss_sums_over_latent_and_averages_over_a_non_uniform_batch():
    mean = torch.tensor([[[[1.0]], [[0.0]]], [[[2.0]], [[-1.0]]]], dtype=torch.float64)  # (2, 2, 1, 1)
    logvar = torch.tensor([[[[0.0]], [[1.0]]], [[[-1.0]], [[0.0]]]], dtype=torch.float64)
    # image 0: 0.5 (1 + 1 - 1 - 0) + 0.5 (0 + e - 1 - 1) = e/2 - 1/2
    # image 1: 0.5 (4 + 1/e - 1 + 1) + 0.5 (1 + 1 - 1 - 0) = 5/2 + 1/(2e); a sum over the batch would double it
    expected = (math.e / 2 - 0.5 + 2.5 + 1 / (2 * math.e)) / 2
    assert kl_loss(mean, logvar).item() == pytest.approx(expected, rel=1e-12)  # float64 exp: ~1e-16


@pytest.mark.numeric
@pytest.mark.parametrize("disc_scale, clamped", [(1.0, False), (0.0, True)])
def test_adaptive_gan_weight_on_a_linear_last_layer(disc_scale, clamped):
    h = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)  # decoder features; x_rec = h @ W^T
    W = nn.Parameter(torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64))
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    c = torch.tensor([1.0, -3.0], dtype=torch.float64) * disc_scale

    class LinearDisc(nn.Module):  # logits = x_rec * c per element
        def forward(self, img):
            return img * c
    fn = ReconstructionLoss(None, l1_weight=10.0, kl_weight=0.0, disc_weight=0.5, disc_start=3,
                            discriminator=LinearDisc())
    x_rec = h @ W.T  # [[-1.5, 2.5], [-1.0, -1.875]]: sign(x_rec - x) = [[-1, 1], [-1, -1]]
    loss, logs = fn.generator_loss(x, x_rec, None, None, W, step=2)  # before disc_start: no GAN term
    assert "d_weight" not in logs
    assert loss.item() == pytest.approx(10 * (x_rec.detach() - x).abs().mean().item(), rel=1e-12)
    loss, logs = fn.generator_loss(x, x_rec, None, None, W, step=3)
    # by hand: d nll/d W_ij = 10/4 sum_n sign_ni h_nj; d g/d W_ij = -1/4 c_i sum_n h_nj (g = -mean(x_rec * c))
    sign, hn, cn = np.array([[-1.0, 1.0], [-1.0, -1.0]]), h.numpy(), c.numpy()
    d_nll = 2.5 * sign.T @ hn
    d_g = -0.25 * np.outer(cn, hn.sum(0))
    ratio = np.linalg.norm(d_nll) / (np.linalg.norm(d_g) + 1e-4)
    assert (ratio > 1e4) == clamped  # the zero-gradient case exercises the clamp at 1e4
    d_weight = 0.5 * min(ratio, 1e4)
    # float64 norms of 4 elements: ~1e-16 relative; a missing disc_weight or clamp changes it by >= 2x, a missing
    # 1e-4 by 2e-5 relative in the unclamped case (ratio 4.47)
    assert logs["d_weight"] == pytest.approx(d_weight, rel=1e-12)
    g = -(x_rec.detach().numpy() * cn).mean()
    assert loss.item() == pytest.approx(10 * np.abs(x_rec.detach().numpy() - x.numpy()).mean() + d_weight * g,
                                        rel=1e-12, abs=1e-12)
    loss.backward()
    # the weight is a constant for backward (detached): W's gradient is d_nll + d_weight * d_g, not more
    assert_close(W.grad, torch.from_numpy(d_nll + d_weight * d_g), rtol=1e-12, atol=1e-12)


def stage2_recipe(kind="mse", weight=2.5):
    torch.manual_seed(0)
    model = AlignTokenizer(tok_config(pretrained="none"))
    target = copy.deepcopy(model).eval()  # the stage-1 copy, NOT frozen here: the recipe must keep it out itself
    with torch.no_grad():
        for p in target.adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a reference the model has drifted from: a nonzero loss
    cfg = Stage2Config(steps=1, batch_size=4, l1_weight=0.0, lpips_weight=0.0, disc_weight=0.0,
                       semantic_weight=weight, semantic_distance=kind)
    loss_fn = ReconstructionLoss(None, l1_weight=0.0, lpips_weight=0.0, kl_weight=0.0, disc_weight=0.0)
    x = torch.stack([Images(4)[i][0] for i in range(4)])
    return TokenizerRecipe(model, None, loss_fn, cfg, 2, "aligntok", target), model, target, x


@pytest.mark.numeric
def test_stage2_semantic_preservation_gradient_reaches_encoder_and_adapter_only():
    weight = 2.5
    recipe, model, target, x = stage2_recipe(weight=weight)
    losses, logs = recipe.losses((x, torch.zeros(4, dtype=torch.long)), step=0)
    losses["generator"].backward()  # l1, LPIPS, KL and GAN are off: the whole loss is weight * semantic term
    got = {n: p.grad.clone() for n, p in model.named_parameters() if not n.startswith("decoder.")}
    assert all(p.grad is None for p in target.parameters())  # the reference copy gets no gradient
    with torch.no_grad():
        z_ref = target.encode(x)
    mean, _ = model.encode_posterior(x)  # the same forward the recipe ran (no randomness): the same values
    diff = mean.detach().double() - z_ref.double()
    # value: fp32 mean of 128 squares vs float64: ~1e-6 relative; the loss is O(1e-2), an unweighted or wrong
    # distance would be off by far more
    assert logs["semantic_preservation"] == pytest.approx(diff.pow(2).mean().item(), rel=1e-5)
    # d(weight * mean((z - z_ref)^2))/dz = 2 weight (z - z_ref) / numel, written by hand; pulled back through the
    # encoder+adapter by autograd (a VJP with this cotangent, independent of the loss code)
    cot = (2 * weight * diff / diff.numel()).float()
    names = [n for n, p in model.named_parameters() if not n.startswith("decoder.")]
    expected = torch.autograd.grad(mean, [dict(model.named_parameters())[n] for n in names], grad_outputs=cot)
    # the adapter's last 1x1 conv adds its bias to z directly: that gradient is the cotangent summed over batch
    # and positions, by hand in float64 (fp32 sums of 64 terms: ~1e-7 relative of the largest term)
    bias = cot.double().sum((0, 2, 3))
    assert bias.abs().min() > 1e-5  # nonzero for every channel
    assert_close(got["adapter.body.4.bias"].double(), bias, rtol=1e-4, atol=1e-6 * bias.abs().max().item())
    # same fp32 backward kernels, cotangents differing by ~1 ulp: ~1e-6 relative, and sums with cancellation get
    # an absolute floor at 1e-5 of the largest entry. A detached z gives 0, a dropped weight 2.5x
    for n, e in zip(names, expected):
        assert_close(got[n], e, rtol=1e-4, atol=1e-5 * e.abs().max().item() + 1e-12, msg=n)
    for part in ("encoder", "adapter"):
        assert sum(got[n].abs().sum().item() for n in names if n.startswith(part + ".")) > 0, part


@pytest.mark.numeric
def test_stage2_cosine_semantic_preservation_value():
    recipe, model, target, x = stage2_recipe(kind="cosine", weight=1.0)
    _, logs = recipe.losses((x, torch.zeros(4, dtype=torch.long)), step=0)
    with torch.no_grad():
        z, r = model.encode(x).double().numpy(), target.encode(x).double().numpy()
    cos = (z * r).sum(1) / (np.linalg.norm(z, axis=1) * np.linalg.norm(r, axis=1))  # over channels, per token
    # fp32 cosine over 8 channels, averaged over 16 tokens: ~1e-7 absolute; an mse in its place, or a cosine over
    # another axis, differs by more than 1e-3 (the value is O(1e-2))
    assert logs["semantic_preservation"] == pytest.approx((1 - cos).mean(), abs=1e-6)
    assert logs["semantic_preservation"] > 1e-3


def test_nan_loss_exits_3_through_the_cli(tmp_path):
    """A huge lr (1e30, a valid value) blows the weights up at step 0: step 1's loss is NaN. The data are prepared
    in-process (the stage's own function, no second interpreter); the stage runs as `aligntok tokenizer-stage1`."""
    from aligntok.config import load_params
    from aligntok.data.sources import prepare_dataset

    shutil.copy(ROOT / "profiles" / "ci.yaml", tmp_path / "params.yaml")
    overrides = ["data.num_images=20", "tokenizer.stage1.lr=1e30", "tokenizer.stage1.steps=3",
                 "tokenizer.stage1.ckpt_every=1", "tokenizer.stage1.disc_start=100"]
    d = load_params(tmp_path / "params.yaml", overrides).data
    prepare_dataset(d.source, tmp_path / "data" / d.name, root=None, resolution=d.resolution, num_images=d.num_images,
                    num_classes=d.num_classes, val_fraction=d.val_fraction, shard_rows=d.shard_rows, seed=0,
                    max_image_pixels=d.max_image_pixels, workers=1, work_dir=tmp_path / "checkpoints/prepare" / d.name)
    cmd = [sys.executable, "-m", "aligntok.cli", "tokenizer-stage1", *(a for o in overrides for a in ("-S", o))]
    proc = subprocess.run(cmd, cwd=tmp_path, env=isolated_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("aligntok:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "loss 'generator' is nan at step 1; stopped" in lines[0], lines[0]
    assert lines[0].endswith("Last good checkpoint kept: checkpoints/tokenizer-stage1/step-00000001"), lines[0]
    assert not (tmp_path / "outputs" / "tokenizer" / "stage1").exists()  # nothing exported from a diverged run
