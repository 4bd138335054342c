"""Issue 22's recipe items, each against a value worked out by hand or read from the reference code: gradient
clipping and the fraction of steps it fired, LightningDiT's log-normal -> uniform switch, the tokenizer
optimisers (VA-VAE's Adam), the discriminator carried from stage to stage, the semantic-preservation gradient
ratio, and the layering of the fingerprints (no module below stages/ imports stages/)."""
import ast
import copy
import shutil

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from aligntok.config import ConfigError, DitConfig, TokenizerStageConfig, load_params
from aligntok.models.tokenizer import AlignTokenizer
from tests.conftest import ROOT
from tests.test_tokenizer_stages import recipe_for, tok_config
from tests.test_train_known_values import LinearRecipe, run_linear

pytestmark = pytest.mark.usefixtures("one_thread")

# Consumers of the stages: the CLI dispatches to them and the benchmarks time their recipes.
STAGE_USERS = ("aligntok/cli.py", "aligntok/stages/", "aligntok/bench/")


def test_no_module_below_the_stages_imports_them():
    """eval/reference.py and generate.py took file_hash / tokenizer_hash from stages/; the fingerprints now live
    in aligntok/fingerprint.py, and nothing under the stages reaches up into them."""
    upward = []
    for f in sorted((ROOT / "aligntok").rglob("*.py")):
        rel = str(f.relative_to(ROOT))
        if rel.startswith(STAGE_USERS):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            upward += [f"{rel}: {n}" for n in names if n == "aligntok.stages" or n.startswith("aligntok.stages.")]
    assert not upward, upward


def test_fingerprints_are_sha256_prefixes(tmp_path):
    import hashlib
    from aligntok.fingerprint import file_hash, tokenizer_hash
    blob = bytes(range(256)) * 9000  # > 2 MiB: the chunked read crosses chunk boundaries
    (tmp_path / "model.safetensors").write_bytes(blob)
    assert file_hash(tmp_path / "model.safetensors") == hashlib.sha256(blob).hexdigest()[:16]
    assert tokenizer_hash(tmp_path) == file_hash(tmp_path / "model.safetensors")


# --- item 5: gradient clipping, and the fraction of steps where it fired ---------------------------------------------

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


def test_paper_profile_follows_the_reference_optimisers():
    """LightningDiT's 64-epoch config has no max_grad_norm; VA-VAE's tokenizer uses Adam (0.5, 0.9) for the
    autoencoder and the discriminator, no weight decay, no scheduler, no clipping (profiles/imagenet256.yaml)."""
    p = load_params(ROOT / "profiles" / "imagenet256.yaml", check_paths=False)
    assert not p.dit.grad_clip and p.dit.lognormal_until is None
    for stage in (p.tokenizer.stage1, p.tokenizer.stage2, p.tokenizer.stage3):
        assert (stage.beta1, stage.beta2, stage.weight_decay, stage.grad_clip, stage.warmup_steps) == (0.5, 0.9, 0, 0, 0)
        assert (stage.disc_beta1, stage.disc_beta2, stage.disc_weight_decay, stage.disc_lr) == (0.5, 0.9, 0, stage.lr)


# --- item 6: LightningDiT's log-normal -> uniform switch ---------------------------------------------------------------

class RecordT(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.t = []

    def forward(self, x, t, y):
        self.t.append(t.clone())
        return x * self.w


@pytest.mark.numeric
def test_lognormal_until_switches_to_uniform_at_that_step():
    from aligntok.diffusion.flow import T_EPS, FlowMatching
    flow = FlowMatching("lognormal", lognormal_until=2)
    assert [flow.sampling_at(s) for s in (0, 1, 2, 3)] == ["lognormal", "lognormal", "uniform", "uniform"]
    assert FlowMatching("lognormal").sampling_at(10 ** 9) == "lognormal"  # null: never switches
    model, x = RecordT(), torch.zeros(4, 2, 2, 2)
    for step in range(4):
        flow.loss(model, x, torch.zeros(4, dtype=torch.long), generator=torch.Generator().manual_seed(step), step=step)
    for step, t in enumerate(model.t):  # the first draw of the same seeded generator, by hand
        g = torch.Generator().manual_seed(step)
        expected = torch.sigmoid(torch.randn(4, generator=g)) if step < 2 else torch.rand(4, generator=g)
        # the same float32 operations on the same draws: equal up to the clamp to [T_EPS, 1 - T_EPS]
        assert_close(t, expected.clamp(T_EPS, 1 - T_EPS), rtol=0, atol=0)


def test_dit_recipe_logs_which_t_distribution_each_step_used():
    from aligntok.models.dit import build_dit
    from aligntok.stages.dit import DitRecipe
    torch.manual_seed(0)
    model = build_dit("tiny", input_size=2, in_channels=4, num_classes=3)
    stats = {"mean": [0.0] * 4, "std": [1.0] * 4}
    batch = (torch.randn(2, 4, 2, 2), torch.tensor([0, 1]))
    on = DitRecipe(model, DitConfig(lognormal_until=5), stats)
    assert [on.losses(batch, s)[1]["t_lognormal"] for s in (4, 5)] == [1.0, 0.0]
    assert "t_lognormal" not in DitRecipe(model, DitConfig(), stats).losses(batch, 0)[1]
    with pytest.raises(ConfigError, match=r"^dit.lognormal_until: given -1; expected input should be greater than or "
                                          r"equal to 0$"):
        load_params(ROOT / "profiles" / "ci.yaml", ["dit.lognormal_until=-1"], check_paths=False)


# --- item 8: the tokenizer optimisers are params -----------------------------------------------------------------------

def test_generator_and_discriminator_optimisers_take_their_params():
    model = AlignTokenizer(tok_config(pretrained="none"))
    recipe, _ = recipe_for(1, model, beta1=0.5, beta2=0.9, weight_decay=0.0, disc_beta1=0.2, disc_beta2=0.8,
                           disc_weight_decay=0.03, disc_lr=3e-4)
    gen, disc = recipe.optimizers()["generator"], recipe.optimizers()["discriminator"]
    assert {(g["betas"], g["weight_decay"]) for g in gen.param_groups} == {((0.5, 0.9), 0.0)}
    assert [(g["betas"], g["weight_decay"], g["lr"]) for g in disc.param_groups] == [((0.2, 0.8), 0.03, 3e-4)]
    # the defaults are VA-VAE's discriminator Adam, not AdamW's weight decay 0.01
    cfg = TokenizerStageConfig()
    assert (cfg.disc_beta1, cfg.disc_beta2, cfg.disc_weight_decay) == (0.5, 0.9, 0.0)

