"""LightningDiT: shapes for every registry entry, the reference parameter count, CFG behaviour, label dropout."""
import pytest
import torch
from torch.testing import assert_close

from aligntok.diffusion.sampler import guided_velocity
from aligntok.models.dit import DIT_MODELS, apply_rope, build_dit, rope_angles

# hustvl/LightningDiT models/lightningdit.py instantiated on `meta` (in_channels 32, input 16, 1000 classes,
# SwiGLU + RMSNorm + RoPE, no QK-norm, class_dropout 0.1): trainable parameters. Its parameters() also holds the
# frozen sin-cos pos_embed (XL/1: 675,256,736 in all, "675.26M" in its train log); ours keeps that as a buffer.
REFERENCE_TRAINABLE = {"LightningDiT-XL/1": 674_961_824, "LightningDiT-B/1": 130_359_584}

# The tiny DiT (4 blocks, hidden 128, outputs of magnitude ~0.1) run on different batch shapes: its fp32 GEMMs
# (K <= 512) are blocked differently per batch size, thread count and ATen kernel, which reorders the sums.
# Measured: batch 1 vs 4 differ by <= 5.2e-8 absolute under ATEN_CPU_CAPABILITY=default/avx2 and one thread
# (batch 8 vs 4 by 3.7e-8 on another CPU). atol 1e-6 (1e-5 of the output scale) leaves 20x margin and is still
# 1e5 times smaller than the guidance effects the tests tell apart (~0.1).
BATCH_SHAPE = dict(rtol=1e-5, atol=1e-6)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(DIT_MODELS))
def test_forward_shapes_for_every_registry_entry(name):
    if name == "tiny":
        model = build_dit(name, input_size=4, in_channels=32, num_classes=10)
        out = model(randn(3, 32, 4, 4), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 5, 9]))
        assert out.shape == (3, 32, 4, 4)
        return
    with torch.device("meta"):
        model = build_dit(name, input_size=16, in_channels=32, num_classes=1000)
        out = model(torch.empty(2, 32, 16, 16), torch.empty(2), torch.tensor([1, 2]))
    assert out.shape == (2, 32, 16, 16)


@pytest.mark.parametrize("name, expected", sorted(REFERENCE_TRAINABLE.items()))
def test_parameter_count_matches_reference(name, expected):
    with torch.device("meta"):
        model = build_dit(name, input_size=16, in_channels=32, num_classes=1000)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_qk_norm_adds_only_the_norm_weights():
    with torch.device("meta"):
        a = build_dit("LightningDiT-XL/1", 16, 32, 1000)
        b = build_dit("LightningDiT-XL/1", 16, 32, 1000, qk_norm=True)
    assert sum(p.numel() for p in b.parameters()) - sum(p.numel() for p in a.parameters()) == 28 * 2 * 72


@pytest.mark.numeric
def test_fresh_model_outputs_zero_and_label_dropout_only_in_training():
    model = build_dit("tiny", 4, 8, 10, class_dropout_prob=0.5)
    # adaLN-Zero: the final layer's weights are zero, so the output is exactly 0 whatever the kernels
    assert model(randn(2, 8, 4, 4), torch.tensor([0.3, 0.7]), torch.tensor([1, 2])).abs().max() == 0
    y = torch.arange(10).repeat(200)
    model.train()
    with torch.random.fork_rng(devices=[]):  # drop_labels draws from the global RNG
        torch.manual_seed(0)
        dropped = model.drop_labels(y)
    # 2000 Bernoulli(0.5) draws: std of the fraction 0.011, so +-0.05 is 4.5 sigma (the seed fixes the draw)
    assert (dropped == 10).float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert torch.equal(dropped[dropped != 10], y[dropped != 10])
    model.eval()
    assert torch.equal(model.drop_labels(y), y)


def _trained_like_model():
    with torch.random.fork_rng(devices=[]):  # seeded, without resetting the caller's global RNG
        torch.manual_seed(0)
        model = build_dit("tiny", 4, 8, 10).eval()
        for p in model.parameters():  # leave adaLN-Zero so outputs depend on the label
            torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.numeric
def test_forward_with_cfg_matches_guidance_rule():
    model = _trained_like_model()
    x, t, y = randn(4, 8, 4, 4), torch.full((4,), 0.5), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        cond = model(x, t, y)  # batch 4; forward_with_cfg runs one batch of 8
        uncond = model(x, t, torch.full_like(y, model.num_classes))
        v1 = model.forward_with_cfg(x, t, y, 1.0)
        v3 = model.forward_with_cfg(x, t, y, 3.0, cfg_channels=3)
        vall = model.forward_with_cfg(x, t, y, 3.0, cfg_channels=None)
    assert_close(v1, cond, **BATCH_SHAPE)
    # the guided combination amplifies the batch-shape error by at most 2*3 + 1 = 7
    assert_close(vall, uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=7e-6)
    assert_close(v3[:, 3:], cond[:, 3:], **BATCH_SHAPE)
    # same 8-batch forward, same process: the guided channels are bit-identical by construction
    assert torch.equal(v3[:, :3], vall[:, :3])
    assert (v3[:, :3] - cond[:, :3]).abs().max() > 1e-2  # guidance changes them (measured ~0.1)


@pytest.mark.numeric
def test_cfg_scale_one_equals_conditional_and_channels_limit():
    model = _trained_like_model()
    x, y = randn(4, 8, 4, 4), torch.tensor([0, 1, 2, 3])
    kw = dict(cfg_interval_start=0, null_class=10)
    with torch.no_grad():
        cond = model(x, torch.full((4,), 0.5), y)
        uncond = model(x, torch.full((4,), 0.5), torch.full_like(y, 10))
        v1 = guided_velocity(model, x, 0.5, y, cfg_scale=1.0, cfg_channels=None, **kw)
        v3 = guided_velocity(model, x, 0.5, y, cfg_scale=4.0, cfg_channels=3, **kw)
        vall = guided_velocity(model, x, 0.5, y, cfg_scale=4.0, cfg_channels=None, **kw)
        vout = guided_velocity(model, x, 0.05, y, cfg_scale=4.0, cfg_channels=None, cfg_interval_start=0.1,
                               null_class=10)
        cond_early = model(x, torch.full((4,), 0.05), y)
    # cfg_scale 1 is one conditional pass on the same batch of 4 as `cond`: bit-identical by construction
    assert torch.equal(v1, cond)
    # guided passes run cond + null as one batch of 8: batch-shape tolerance (see BATCH_SHAPE)
    assert_close(v3[:, 3:], cond[:, 3:], **BATCH_SHAPE)
    assert_close(vall, uncond + 4.0 * (cond - uncond), rtol=1e-5, atol=9e-6)  # error amplified by <= 2*4 + 1
    assert torch.equal(vall[:, :3], v3[:, :3])  # the same 8-batch forward in both calls
    assert (v3[:, :3] - cond[:, :3]).abs().max() > 1e-2 and (vall[:, 3:] - cond[:, 3:]).abs().max() > 1e-2
    assert torch.equal(vout, cond_early)  # t below the guidance interval: one conditional pass, batch 4


@pytest.mark.numeric
def test_rope_is_a_rotation_and_relative():
    ang = rope_angles(4, 16)
    q = randn(1, 1, 16, 16)
    # fp32 rotation of 16-d vectors of norm ~4-6: norms agree to a few ulp (measured 4.8e-7)
    assert_close(apply_rope(q, ang).norm(dim=-1), q.norm(dim=-1), rtol=1e-6, atol=1e-5)
    # same vectors at every position: the dot product depends only on the offset between positions
    v = randn(16, seed=1).expand(1, 1, 16, 16)
    r = apply_rope(v, ang)[0, 0]
    dots = r @ r.T
    # 16-term fp32 dot products of magnitude ~13, computed at different angles: measured <= 9.5e-7 apart
    assert_close(dots[0, 1], dots[4, 5], rtol=1e-5, atol=1e-5)
    assert_close(dots[0, 4], dots[1, 5], rtol=1e-5, atol=1e-5)
