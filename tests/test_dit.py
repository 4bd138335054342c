"""LightningDiT: shapes for every registry entry, the reference parameter count, CFG behaviour, label dropout."""
import pytest
import torch

from aligntok.diffusion.sampler import guided_velocity
from aligntok.models.dit import DIT_MODELS, apply_rope, build_dit, rope_angles

# hustvl/LightningDiT models/lightningdit.py instantiated on `meta` (in_channels 32, input 16, 1000 classes,
# SwiGLU + RMSNorm + RoPE, no QK-norm, class_dropout 0.1): trainable parameters. Its parameters() also holds the
# frozen sin-cos pos_embed (XL/1: 675,256,736 in all, "675.26M" in its train log); ours keeps that as a buffer.
REFERENCE_TRAINABLE = {"LightningDiT-XL/1": 674_961_824, "LightningDiT-B/1": 130_359_584}


@pytest.mark.parametrize("name", sorted(DIT_MODELS))
def test_forward_shapes_for_every_registry_entry(name):
    if name == "tiny":
        model = build_dit(name, input_size=4, in_channels=32, num_classes=10)
        out = model(torch.randn(3, 32, 4, 4), torch.rand(3), torch.tensor([0, 5, 9]))
        assert out.shape == (3, 32, 4, 4)
        return
    with torch.device("meta"):
        model = build_dit(name, input_size=16, in_channels=32, num_classes=1000)
        out = model(torch.randn(2, 32, 16, 16), torch.rand(2), torch.tensor([1, 2]))
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


def test_fresh_model_outputs_zero_and_label_dropout_only_in_training():
    model = build_dit("tiny", 4, 8, 10, class_dropout_prob=0.5)
    assert model(torch.randn(2, 8, 4, 4), torch.rand(2), torch.tensor([1, 2])).abs().max() == 0
    y = torch.arange(10).repeat(20)
    model.train()
    dropped = model.drop_labels(y)
    assert (dropped == 10).float().mean().item() == pytest.approx(0.5, abs=0.1)
    assert torch.equal(dropped[dropped != 10], y[dropped != 10])
    model.eval()
    assert torch.equal(model.drop_labels(y), y)


def _trained_like_model():
    torch.manual_seed(0)
    model = build_dit("tiny", 4, 8, 10).eval()
    for p in model.parameters():  # leave adaLN-Zero so outputs depend on the label
        torch.nn.init.normal_(p, std=0.05)
    return model


def test_forward_with_cfg_matches_guidance_rule():
    model = _trained_like_model()
    x, t, y = torch.randn(4, 8, 4, 4), torch.full((4,), 0.5), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, model.num_classes))
        assert torch.allclose(model.forward_with_cfg(x, t, y, 1.0), cond, atol=1e-6)
        v3 = model.forward_with_cfg(x, t, y, 3.0, cfg_channels=3)
        vall = model.forward_with_cfg(x, t, y, 3.0, cfg_channels=None)
    assert torch.allclose(vall, uncond + 3.0 * (cond - uncond), atol=1e-5)
    assert torch.allclose(v3[:, 3:], cond[:, 3:], atol=1e-6) and torch.allclose(v3[:, :3], vall[:, :3], atol=1e-6)
    assert not torch.allclose(v3[:, :3], cond[:, :3])


def test_cfg_scale_one_equals_conditional_and_channels_limit():
    model = _trained_like_model()
    x, y = torch.randn(4, 8, 4, 4), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        cond = model(x, torch.full((4,), 0.5), y)
        v1 = guided_velocity(model, x, 0.5, y, cfg_scale=1.0, cfg_channels=None, cfg_interval_start=0, null_class=10)
        v3 = guided_velocity(model, x, 0.5, y, cfg_scale=4.0, cfg_channels=3, cfg_interval_start=0, null_class=10)
        vall = guided_velocity(model, x, 0.5, y, cfg_scale=4.0, cfg_channels=None, cfg_interval_start=0, null_class=10)
        vout = guided_velocity(model, x, 0.05, y, cfg_scale=4.0, cfg_channels=None, cfg_interval_start=0.1, null_class=10)
    assert torch.allclose(v1, cond)
    assert torch.allclose(v3[:, 3:], cond[:, 3:]) and not torch.allclose(v3[:, :3], cond[:, :3])
    assert torch.allclose(vall[:, :3], v3[:, :3]) and not torch.allclose(vall[:, 3:], cond[:, 3:])
    with torch.no_grad():
        cond_early = model(x, torch.full((4,), 0.05), y)
    assert torch.allclose(vout, cond_early)  # t below the guidance interval: conditional only


def test_rope_is_a_rotation_and_relative():
    ang = rope_angles(4, 16)
    q = torch.randn(1, 1, 16, 16)
    assert torch.allclose(apply_rope(q, ang).norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    # same vectors at every position: the dot product depends only on the offset between positions
    v = torch.randn(16).expand(1, 1, 16, 16)
    r = apply_rope(v, ang)[0, 0]
    dots = r @ r.T
    assert torch.allclose(dots[0, 1], dots[4, 5], atol=1e-4) and torch.allclose(dots[0, 4], dots[1, 5], atol=1e-4)
