"""The text DiT through the generator: samples for a prompt set, guided with the DiT's learned null caption inside
the sampler's interval, de-normalised with the training statistics; the text training step's objective."""
import pytest
import torch

from aligntok.config import SampleConfig
from aligntok.diffusion.sampler import combine_cfg, time_grid
from aligntok.generate import Generator, sample_noise
from aligntok.models.t2i_dit import build_t2i_dit

C, H, D, L = 4, 4, 8, 6
STATS = {"mean": [0.5, -0.25, 0.0, 1.0], "std": [2.0, 0.5, 1.0, 3.0]}


def text_generator(seed=0):
    torch.manual_seed(seed)
    dit = build_t2i_dit("tiny", input_size=H, in_channels=C, text_dim=D).eval()
    with torch.no_grad():  # adaLN-Zero starts at a constant output: give every layer weights that matter
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config = {"task": "text", "model": "tiny", "input_size": H, "in_channels": C, "num_classes": 1,
              "text_dim": D, "latent_stats": STATS}
    gen = Generator(dit, config, tokenizer=None, device=torch.device("cpu"))
    hidden = torch.randn(3, L, D)
    mask = torch.arange(L)[None] < torch.tensor([[6], [2], [4]])
    gen.set_prompts(hidden * mask[..., None], mask, digest="test")
    return gen, dit, hidden * mask[..., None], mask


def by_hand(dit, hidden, mask, noise, sample, scale):
    """Euler by hand: v = v_null + s (v_caption - v_null) where t is in [cfg_interval_start, 1), else v_caption."""
    x = noise.clone()
    grid = time_grid(sample.steps, sample.timestep_shift)
    b = x.shape[0]
    for t0, t1 in zip(grid[:-1], grid[1:]):
        t = torch.full((b,), t0)
        cond = dit(x, t, hidden, mask, drop=torch.zeros(b, dtype=torch.bool))
        if scale != 1 and sample.cfg_interval_start <= t0 < 1:
            uncond = dit(x, t, hidden, mask, drop=torch.ones(b, dtype=torch.bool))
            v = combine_cfg(cond, uncond, scale, None)
        else:
            v = cond
        x = x + (t1 - t0) * v
    mean = torch.tensor(STATS["mean"])[:, None, None]
    std = torch.tensor(STATS["std"])[:, None, None]
    return x * std + mean


@pytest.mark.numeric
@pytest.mark.parametrize("scale,start", [(1.0, 0.0), (3.0, 0.0), (3.0, 0.4)])
def test_text_samples_are_guided_by_the_null_caption_inside_the_interval(scale, start):
    gen, dit, hidden, mask = text_generator()
    sample = SampleConfig(steps=5, cfg_scale=scale, cfg_interval_start=start, timestep_shift=0.3)
    prompts = torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        got = gen.latents(prompts, [0, 1, 2, 3], sample)
        noise = sample_noise([0, 1, 2, 3], (C, H, H), sample.seed)
        want = by_hand(dit, hidden[prompts], mask[prompts], noise, sample, scale)
    # the same float32 ops in the same order, batched alike: only the sampler's float64 grid arithmetic differs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.numeric
def test_guidance_changes_samples_and_the_null_caption_is_learned():
    gen, dit, hidden, mask = text_generator()
    sample = SampleConfig(steps=4)
    with torch.no_grad():
        plain = gen.latents(torch.tensor([0, 1]), [0, 1], sample, cfg_scale=1.0)
        guided = gen.latents(torch.tensor([0, 1]), [0, 1], sample, cfg_scale=4.0)
        assert (plain - guided).abs().max() > 1e-3
        dit.null_text.add_(1.0)  # the unconditional branch reads the DiT's null caption, nothing else
        moved = gen.latents(torch.tensor([0, 1]), [0, 1], sample, cfg_scale=4.0)
        same_plain = gen.latents(torch.tensor([0, 1]), [0, 1], sample, cfg_scale=1.0)
    assert (moved - guided).abs().max() > 1e-3
    torch.testing.assert_close(same_plain, plain, rtol=0, atol=0)


def test_a_text_generator_needs_its_prompts():
    gen, *_ = text_generator()
    gen.prompts = None
    with pytest.raises(ValueError, match="set_prompts"):
        gen.latents(torch.tensor([0]), [0], SampleConfig(steps=2))
    assert gen.is_text


@pytest.mark.numeric
def test_the_text_training_step_is_flow_matching_on_the_caption():
    """DitRecipe's text loss equals FlowMatching.loss of the DiT called with that batch's captions."""
    from aligntok.config import DitConfig
    from aligntok.data.latents import normalize
    from aligntok.diffusion.flow import FlowMatching
    from aligntok.stages.dit import DitRecipe

    _, dit, hidden, mask = text_generator()
    dit.train()
    dit.caption_dropout_prob = 0.0  # no random caption drop: the two computations draw the same numbers
    recipe = DitRecipe(dit, DitConfig(cosine_loss=True), STATS)
    assert recipe.text
    z = torch.randn(3, C, H, H)
    torch.manual_seed(5)
    losses, logs = recipe.losses((z, hidden, mask), step=0)
    torch.manual_seed(5)
    flow = FlowMatching(timestep_sampling="lognormal", use_cosine_loss=True)
    want, _ = flow.loss(lambda x, t, _: dit(x, t, hidden, mask), normalize(z, STATS), None, step=0)
    torch.testing.assert_close(losses["dit"], want, rtol=1e-6, atol=1e-7)
    torch.manual_seed(5)
    other, _ = flow.loss(lambda x, t, _: dit(x, t, hidden.flip(0), mask.flip(0)), normalize(z, STATS), None, step=0)
    assert abs(float(other.detach()) - float(want.detach())) > 1e-4  # the captions reach the DiT


def test_summary_prints_caption_scores_beside_chance_and_clip_scores_status():
    from aligntok.stages.summary import table
    protocol = {"task": "text", "fid_backbone": "efficientnet-lite0", "feature_dim": 112, "num_samples": 200,
                "prompts": "the val split's captions (first 200)", "sampler": "euler", "steps": 30,
                "reference": "scenes-val (204 images)", "cfg_scale": 4.0, "clip_score": "not measured: text.clip_model is null"}
    metrics = {"caption_acc_judge_cfg": 0.125, "caption_acc_chance": 1 / 384, "attr_acc_position_judge": 0.5,
               "attr_acc_position_chance": 0.25, "gfid": 12.0}
    rows = table(metrics, protocol)
    assert "| caption_acc_judge_cfg | 0.125 | caption judge: every attribute of the prompt read back, CFG 4; " \
           "chance 0.002604 |" in rows
    assert "| attr_acc_position_judge | 0.5 | caption judge: the position named in the prompt; chance 0.25 |" in rows
    assert "| clip_score | n/a | not measured: text.clip_model is null |" in rows
    assert any(r.startswith("| gfid | 12 | FD in efficientnet-lite0-112, 200 samples for the val split's captions")
               for r in rows), rows
