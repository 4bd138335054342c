"""The text-conditioned LightningDiT: shapes, parameter counts of every preset against a closed form, padding,
the learned null caption, classifier-free guidance as the sampler runs it, and a tiny model learning two captions."""
import pytest
import torch
from torch.testing import assert_close

from aligntok.diffusion.flow import FlowMatching
from aligntok.diffusion.sampler import sample
from aligntok.models.dit import Block
from aligntok.models.t2i_dit import SIZES, T2I_DIT_MODELS, build_t2i_dit

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one thread is faster and unaffected by core count

TEXT_DIM = 16
# Outputs of the perturbed tiny model (magnitude up to 1.3) computed for batches or caption lengths of other shapes:
# the fp32 GEMMs, reductions and attention are blocked differently, which reorders the sums. Measured <= 4.8e-7
# apart (4 ulps at 1.3; the same under ATEN_CPU_CAPABILITY=default and avx2). atol 5e-6 leaves 10x margin and is
# 3000x below the smallest effect the tests tell apart (an unmasked token: 0.015).
BATCH_SHAPE = dict(rtol=1e-5, atol=5e-6)
GUIDED = dict(rtol=1e-5, atol=4.5e-5)  # guidance at scale 4 amplifies that error by at most 2 * 4 + 1


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _model(**kw):
    """The tiny model with every weight perturbed (adaLN-Zero would make the output exactly 0), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_t2i_dit("tiny", 4, 8, TEXT_DIM, depth=2, **kw).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.1)
    return model


def _inputs(b=2, length=5):
    """Latents, times, caption states and a mask whose first row has 3 tokens, the others `length`."""
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False
    return randn(b, 8, 4, 4), torch.linspace(0.3, 0.7, b), randn(b, length, TEXT_DIM, seed=1), mask


def expected_params(depth, d, heads, in_channels, patch, text_dim, null_len=1, mlp_ratio=4.0, qk_norm=True,
                    use_rmsnorm=True):
    """Closed-form parameter count of the architecture (SwiGLU MLP; weights + biases of every Linear)."""
    norm = d if use_rmsnorm else 0  # RMSNorm has a scale; the LayerNorm alternative has no affine
    head_norms = 2 * (d // heads) if qk_norm and use_rmsnorm else 0
    hidden = int(2 / 3 * int(d * mlp_ratio))
    mlp = (d * 2 * hidden + 2 * hidden) + (hidden * d + d)
    stream = 2 * norm + (3 * d * d + 3 * d) + head_norms + (d * d + d) + mlp + (6 * d * d + 6 * d)
    text_kv = norm + (2 * d * d + 2 * d) + head_norms // 2 + (2 * d * d + 2 * d)  # last block: keys, values
    blocks = depth * stream + (depth - 1) * stream + text_kv
    x_embed = in_channels * patch * patch * d + d
    t_embed = (256 * d + d) + (d * d + d)
    text = (text_dim if use_rmsnorm else 0) + 2 * ((text_dim * d + d) + (d * d + d)) + null_len * text_dim
    final = norm + (2 * d * d + 2 * d) + (d * patch * patch * in_channels + patch * patch * in_channels)
    return blocks + x_embed + t_embed + text + final


@pytest.mark.parametrize("name", sorted(T2I_DIT_MODELS))
def test_parameter_count_of_every_preset_matches_the_closed_form(name):
    with torch.device("meta"):
        model = build_t2i_dit(name, input_size=16, in_channels=32, text_dim=4096)
    size = name.removeprefix("T2I-").split("/")[0]
    depth, d, heads = SIZES.get(size, (4, 128, 4))
    patch = 2 if name.endswith("/2") else 1
    assert sum(p.numel() for p in model.parameters()) == expected_params(depth, d, heads, 32, patch, 4096)
    if size == "2B":
        assert 1.9e9 < expected_params(depth, d, heads, 32, patch, 4096) < 2.1e9  # the paper's ~2B model


@pytest.mark.parametrize("flags", [dict(qk_norm=False), dict(use_rmsnorm=False), dict(null_len=7)])
def test_parameter_count_follows_the_flags(flags):
    with torch.device("meta"):
        model = build_t2i_dit("T2I-B/2", input_size=32, in_channels=16, text_dim=768, **flags)
    assert sum(p.numel() for p in model.parameters()) == expected_params(12, 768, 12, 16, 2, 768, **flags)


@pytest.mark.parametrize("name", ["tiny", "tiny/2"])
def test_forward_shapes(name):
    model = build_t2i_dit(name, input_size=4, in_channels=8, text_dim=TEXT_DIM)
    x, t, text, mask = _inputs(b=3)
    out = model(x, t, text, mask)
    assert out.shape == (3, 8, 4, 4)
    assert out.abs().max() == 0  # adaLN-Zero: a fresh model's output is exactly 0


@pytest.mark.numeric
def test_padding_changes_no_output():
    model = _model()
    x, t, text, mask = _inputs()
    with torch.no_grad():
        batch = model(x, t, text, mask)  # row 0: 3 tokens + 2 padded, masked in attention
        alone = model(x[:1], t[:1], text[:1, :3], mask[:1, :3])  # row 0 without padding: no mask at all
        garbage = text.clone()
        garbage[0, 3:] = 1e3
        padded = torch.cat([garbage, randn(2, 4, TEXT_DIM, seed=2)], dim=1)  # + 4 columns of padding in every row
        more = model(x, t, padded, torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1))
        unmasked = mask.clone()
        unmasked[0, 3] = True
        leak = model(x, t, garbage, unmasked)
    assert_close(batch[:1], alone, **BATCH_SHAPE)
    # columns that are padding in every row are dropped and padded states are zeroed: the same computation
    assert torch.equal(more, batch)
    assert (leak[:1] - batch[:1]).abs().max() > 1e-3  # the same token unmasked does reach the image (0.015)


@pytest.mark.numeric
def test_a_caption_change_changes_the_output():
    model = _model()
    x, t, text, mask = _inputs()
    other = text.clone()
    other[0, 1] = randn(TEXT_DIM, seed=3)
    with torch.no_grad():
        a, b = model(x, t, text, mask), model(x, t, other, mask)
    assert (a[0] - b[0]).abs().max() > 1e-3  # measured 0.019
    # every row's caption is its own: row 1 is unchanged up to nothing (same batch shape, same kernels)
    assert torch.equal(a[1], b[1])


@pytest.mark.parametrize("null_len", [1, 3])  # 3 > the shortest caption batch below: the batch is widened
def test_dropped_captions_give_the_null_output_whatever_the_caption(null_len):
    model = _model(null_len=null_len)
    x, t, text, mask = _inputs()
    drop = torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        a = model(x, t, text, mask, drop=drop)
        b = model(x, t, randn(2, 2, TEXT_DIM, seed=4), torch.ones(2, 2, dtype=torch.bool), drop=drop)
        cond = model(x, t, text, mask)
        half = model(x, t, text, mask, drop=torch.tensor([True, False]))
    # both batches become the null caption followed by padding columns, which are dropped: the same computation
    assert torch.equal(a, b)
    assert (a - cond).abs().max() > 1e-3  # measured 0.02-0.07
    assert_close(half[0], a[0], **BATCH_SHAPE)
    assert_close(half[1], cond[1], **BATCH_SHAPE)


def test_caption_dropout_draws_in_training_only():
    model = build_t2i_dit("tiny", 4, 8, TEXT_DIM, depth=1, caption_dropout_prob=0.5).train()
    text, mask = randn(2000, 2, TEXT_DIM), torch.ones(2000, 2, dtype=torch.bool)
    with torch.random.fork_rng(devices=[]):  # the draw uses the global RNG, as the class model's label dropout
        torch.manual_seed(0)
        dropped_text, dropped_mask = model.drop_captions(text, mask, None)
    dropped = ~dropped_mask[:, 1]  # the null caption (1 token) leaves the second column padding
    # 2000 Bernoulli(0.5) draws: std of the fraction 0.011, so +-0.05 is 4.5 sigma (the seed fixes the draw)
    assert dropped.float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert torch.equal(dropped_text[dropped, 0], model.null_text.detach()[0].expand(int(dropped.sum()), -1))
    assert torch.equal(dropped_text[~dropped], text[~dropped])
    model.eval()
    same_text, same_mask = model.drop_captions(text, mask, None)
    assert same_text is text and same_mask is mask


def test_the_null_caption_learns_from_dropped_rows_only():
    model = _model().train()
    x, t, text, mask = _inputs()
    model(x, t, text, mask, drop=torch.tensor([False, True])).square().mean().backward()
    assert model.null_text.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model(x, t, text, mask, drop=torch.zeros(2, dtype=torch.bool)).square().mean().backward()
    assert model.null_text.grad is None or model.null_text.grad.abs().sum() == 0


@pytest.mark.numeric
def test_guidance_matches_the_rule_and_the_sampler_interval():
    model = _model()
    x, _, text, mask = _inputs(b=4)
    t = torch.full((4,), 0.5)
    with torch.no_grad():
        cond = model(x, t, text, mask)
        null = model(x, t, text, mask, drop=torch.ones(4, dtype=torch.bool))
        v1 = model.forward_with_cfg(x, t, text, mask, 1.0)
        v4 = model.forward_with_cfg(x, t, text, mask, 4.0)
        v4c = model.forward_with_cfg(x, t, text, mask, 4.0, cfg_channels=3)
        early = model.forward_with_cfg(x, torch.full((4,), 0.05), text, mask, 4.0, cfg_interval_start=0.1)
        mixed = model.forward_with_cfg(x, torch.tensor([0.05, 0.5, 0.05, 0.5]), text, mask, 4.0,
                                       cfg_interval_start=0.1)
        cond_mixed = model(x, torch.tensor([0.05, 0.5, 0.05, 0.5]), text, mask)
    assert torch.equal(v1, cond)  # scale 1: one conditional pass on the same batch
    assert torch.equal(early, model(x, torch.full((4,), 0.05), text, mask))  # below the interval: likewise
    assert_close(v4, null + 4.0 * (cond - null), **GUIDED)  # caption and null as one batch of 8
    assert (v4 - cond).abs().max() > 1e-2  # measured 0.22
    assert torch.equal(v4c[:, :3], v4[:, :3])
    assert_close(v4c[:, 3:], cond[:, 3:], **BATCH_SHAPE)
    assert_close(mixed[0::2], cond_mixed[0::2], **BATCH_SHAPE)  # rows outside the interval stay conditional
    assert_close(mixed[1::2], v4[1::2], **GUIDED)


@pytest.mark.numeric
def test_guidance_is_combined_in_float32_under_bf16_autocast():
    model = _model()
    x, t, text, mask = _inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        guided = model.forward_with_cfg(x, t, text, mask, 4.0)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, text]), torch.cat([mask, mask]),
                     drop=torch.tensor([False, False, True, True]))
    cond, null = both.float().chunk(2)
    assert both.dtype == torch.bfloat16 and guided.dtype == torch.float32
    assert torch.equal(guided, null + 4.0 * (cond - null))  # the same bf16 outputs, combined in fp32


@pytest.mark.numeric
def test_runs_in_the_sampler_with_guidance_inside_the_interval():
    model = _model()
    x, _, text, mask = _inputs()

    def velocity(scale, start):  # the sampler's model_fn(x, t, y); the caption is bound here, not passed as y
        return lambda xt, tt, _: model.forward_with_cfg(xt, tt, text, mask, scale, cfg_interval_start=start)

    with torch.no_grad():
        guided = sample(velocity(4.0, 0.5), x, None, steps=4, method="heun")  # grid 0, .25, .5, .75, 1
        plain = sample(velocity(1.0, 0.0), x, None, steps=4, method="heun")
        never = sample(velocity(4.0, 1.0), x, None, steps=4, method="heun")  # an empty interval: guidance off
    assert guided.shape == x.shape and torch.isfinite(guided).all()
    assert (guided - plain).abs().max() > 1e-2
    assert torch.equal(never, plain)


def test_without_caption_tokens_a_joint_block_is_the_class_block():
    model = _model()
    blk, img, c = model.blocks[0], randn(2, 16, 128), randn(2, 128, seed=5)
    with torch.no_grad():
        joint, _ = blk(img, torch.zeros(2, 0, 128), c, model.rope, None)
        assert torch.equal(joint, Block.forward(blk.image, img, c, model.rope))


def _loss_and_grads(model, x, t, text, mask):
    """One forward/backward with one caption kept and one dropped: the loss and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    loss = model(x, t, text, mask, drop=torch.tensor([False, True])).square().mean()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.numeric
def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    model = _model().train()
    x, t, text, mask = _inputs()

    plain = _loss_and_grads(model, x, t, text, mask)
    model.grad_checkpointing = True
    again = _loss_and_grads(model, x, t, text, mask)
    # recomputation re-runs the same kernels on the same inputs: bit-identical as measured; atol 1e-7 only
    # allows a kernel picking another reduction order
    assert_close(again[0], plain[0], rtol=0, atol=1e-7)
    for k in plain[1]:
        assert_close(again[1][k], plain[1][k], rtol=0, atol=1e-7, msg=k)


def test_every_parameter_gets_a_gradient():
    """No parameter outside the graph (DistributedDataParallel refuses them): the last block's caption stream
    holds keys and values only."""
    model = _model().train()
    x, t, text, mask = _inputs()
    model(x, t, text, mask, drop=torch.tensor([False, True])).square().mean().backward()
    assert [k for k, p in model.named_parameters() if p.grad is None] == []


def test_refuses_wrong_inputs_and_names():
    model = build_t2i_dit("tiny", 4, 8, TEXT_DIM, depth=1)
    x, t, text, mask = _inputs()
    with pytest.raises(ValueError, match=r"expected \(B, L, 16\)"):
        model(x, t, text[..., :8], mask)
    with pytest.raises(ValueError, match="expected .* and \\(B, L\\)"):
        model(x, t, text, mask[:, :2])
    with pytest.raises(ValueError, match="null_len"):
        build_t2i_dit("tiny", 4, 8, TEXT_DIM, null_len=0)
    with pytest.raises(ValueError, match="expected one of"):
        build_t2i_dit("T2I-huge", 4, 8, TEXT_DIM)


@pytest.mark.numeric
def test_a_tiny_model_learns_two_captioned_images():
    """40 AdamW steps of the flow-matching objective on 2 latent/caption pairs (~4 s on one loaded core): the
    loss at fixed noise and times falls below half, and swapping the captions makes it far worse, so the
    images are told apart by their captions. Measured: 1.87 -> 0.49, swapped 2.04."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_t2i_dit("tiny", 4, 8, TEXT_DIM, depth=2, caption_dropout_prob=0.0)
    x1, text = randn(2, 8, 4, 4, seed=6), randn(2, 6, TEXT_DIM, seed=7)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    flow = FlowMatching(use_cosine_loss=False)

    def loss(captions, reps, generator):
        return flow.loss(lambda xt, tt, _: model(xt, tt, captions.repeat(reps, 1, 1), mask.repeat(reps, 1)),
                         x1.repeat(reps, 1, 1, 1), None, generator=generator)[0]

    def held_out(captions):
        with torch.no_grad():
            return float(loss(captions, 16, torch.Generator().manual_seed(123)))

    before = held_out(text)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        opt.zero_grad()
        loss(text, 4, g).backward()
        opt.step()
    after, swapped = held_out(text), held_out(text.flip(0))
    assert after < 0.5 * before
    assert swapped > 2 * after


@pytest.mark.slow
def test_compiled_blocks_give_the_same_loss_and_gradients():
    model = _model().train()
    x, t, text, mask = _inputs()

    eager = _loss_and_grads(model, x, t, text, mask)
    keys = list(model.state_dict())
    model.compile_blocks()
    compiled = _loss_and_grads(model, x, t, text, mask)
    assert list(model.state_dict()) == keys
    # inductor fuses elementwise ops and may reorder fp32 reductions: a few ulps of O(1) values; atol 1e-5 still
    # fails on any wrong graph (errors of 1e-2 or more), as tests/test_gpu_options.py's compiled-block test
    assert_close(compiled[0], eager[0], rtol=0, atol=1e-5)
    for k in eager[1]:
        assert_close(compiled[1][k], eager[1][k], rtol=0, atol=1e-5, msg=k)
