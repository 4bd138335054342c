"""Our LightningDiT against LightningDiT's own model code (a checkout outside this repository at LIGHTNINGDIT_ROOT,
loaded by aligntok.bench.reference; without it these tests skip, saying how to get it): with the same
weights, the same outputs and the same gradients, at the head sizes of the registry (32, 64 and 72 channels per
head), with label dropout drawn the same way in training mode; our RoPE in the reference's interleaved layout on
every path (float32 complex form, the real form used for bf16/fp16 and under torch.compile).

Tolerance: both models run the same fp32 GEMMs; they differ only in how elementwise work is grouped (a complex
multiply for RoPE where the reference uses rotate_half, addcmul where it uses mul + add, one rms_norm op, split
where it unbinds), each a rounding difference of at most an ulp or two per op. Measured over 2 blocks with the
perturbed weights below (outputs of magnitude ~0.9, gradients compared relative to each tensor's largest entry),
worst of ATEN_CPU_CAPABILITY=default, avx2 and one thread: outputs <= 2.4e-7 apart, gradients <= 3.4e-7 of
their scale. atol 1e-6 on outputs and 2e-6 of scale on gradients leave 4-6x margin; a wrong rotation layout,
a missing modulation or a dropped gradient path moves them by 1e-2 or more."""
import pytest
import torch
from torch.testing import assert_close

from aligntok.bench.reference import (build_reference, load_ours_into_reference, reference_key, unavailable_reason,
                                      vision_rope)
from aligntok.models.dit import apply_rope, build_dit, rope_angles, rope_table

_MISSING = unavailable_reason()
pytestmark = [pytest.mark.numeric, pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]

OUT_ATOL = 1e-6
GRAD_REL = 2e-6


def _pair(hidden: int, heads: int, qk_norm: bool = False):
    torch.manual_seed(0)
    ours = build_dit("tiny", input_size=8, in_channels=8, num_classes=10, depth=2, hidden_size=hidden, num_heads=heads,
                     qk_norm=qk_norm)
    with torch.no_grad():  # leave adaLN-Zero so every path (and every gradient) carries signal
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ref = build_reference("tiny", input_size=8, in_channels=8, num_classes=10, depth=2, hidden_size=hidden,
                          num_heads=heads, use_qknorm=qk_norm)
    load_ours_into_reference(ours, ref)
    return ours, ref


def _run(model, x, t, y, seed: int):
    model.zero_grad(set_to_none=True)
    with torch.compiler.set_stance("force_eager"), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # label dropout draws from the global RNG, the same draw in both models
        out = model(x, t, y)
    out.pow(2).mean().backward()
    return out.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("hidden, heads, qk_norm, train", [(128, 4, False, False), (128, 2, False, True),
                                                          (144, 2, False, True), (128, 4, True, False)])
def test_outputs_and_gradients_match_the_reference(hidden, heads, qk_norm, train):
    ours, ref = _pair(hidden, heads, qk_norm)
    ours.train(train), ref.train(train)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 8, 8, 8, generator=g), torch.rand(3, generator=g), torch.tensor([0, 4, 9])
    out, grads = _run(ours, x, t, y, seed=3)
    ref_out, ref_grads = _run(ref, x, t, y, seed=3)
    assert out.abs().max() > 0.1  # a real signal, not adaLN-Zero's zeros
    assert_close(out, ref_out, rtol=0, atol=OUT_ATOL)
    assert len(grads) == len(ref_grads) > 0
    for k, gk in grads.items():
        scale = gk.abs().max().item()
        assert scale > 0, k
        assert_close(gk, ref_grads[reference_key(k)], rtol=0, atol=GRAD_REL * scale, msg=k)


def test_label_dropout_in_training_is_the_reference_draw():
    ours, ref = _pair(128, 4)
    ours.train(), ref.train()
    x, t, y = torch.zeros(64, 8, 8, 8), torch.full((64,), 0.5), torch.arange(64) % 10
    out, _ = _run(ours, x, t, y, seed=5)
    ref_out, _ = _run(ref, x, t, y, seed=5)
    assert_close(out, ref_out, rtol=0, atol=OUT_ATOL)
    eval_out, _ = _run(ours.eval(), x, t, y, seed=5)
    assert (eval_out - out).abs().amax(dim=(1, 2, 3)).gt(1e-3).any()  # some labels were dropped (p = 0.1 of 64)


@pytest.mark.parametrize("head_dim, grid", [(32, 4), (64, 16), (72, 16)])
def test_rope_is_the_reference_rotation(head_dim, grid):
    rope = vision_rope(dim=head_dim // 2, pt_seq_len=grid)
    table = rope_table(rope_angles(grid, head_dim))
    x = torch.randn(2, 3, grid * grid, head_dim, generator=torch.Generator().manual_seed(0))
    expected = rope(x)
    # fp32: the same rotation, with tables computed in float64 (ours) vs float32 (theirs): angles up to 15 rad are
    # ~1 fp32 ulp (1e-6 rad) apart, on values of magnitude <= 4.6: measured <= 4.3e-6 apart (head 72), 2.3x margin
    assert_close(apply_rope(x, table=table), expected, rtol=0, atol=1e-5)
    # tokens on another dim (how the attention calls it: (B, N, 2, heads, D))
    moved = apply_rope(x.permute(0, 2, 1, 3), table=table, token_dim=1).permute(0, 2, 1, 3)
    assert_close(moved, apply_rope(x, table=table), rtol=0, atol=0)
    # the real form used for half types and under torch.compile, in float16: the table and the result rounded to
    # fp16 (half-ulp 4.9e-4 relative) on values <= 4.6: measured <= 2.6e-3 from the fp32 rotation; atol 1e-2
    half = apply_rope(x.half(), table=table).float()
    assert_close(half, rope(x.half().float()), rtol=0, atol=1e-2)
    assert (apply_rope(x, table=table) - x).abs().max() > 0.5  # it does rotate
