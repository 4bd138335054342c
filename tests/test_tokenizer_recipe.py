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

from aligntok.config import ConfigError, DitConfig, TokenizerStageConfig, load_params
from aligntok.models.tokenizer import AlignTokenizer
from tests.conftest import ROOT
from tests.test_tokenizer_stages import recipe_for, tok_config
from tests.test_dvc_native import recorded_repo  # noqa: F401 - the fixture, for the sweep test
from tests.test_train_known_values import LinearRecipe

pytestmark = pytest.mark.usefixtures("one_thread")

# Consumers of the stages: the CLI dispatches to them, the benchmarks time their recipes and preflight sizes what
# they will build (aligntok/preflight*.py, run by the CLI before a stage).
STAGE_USERS = ("aligntok/cli.py", "aligntok/stages/", "aligntok/bench/", "aligntok/preflight")


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


# --- item 5: gradient clipping (the loop's known values are in test_train_known_values.py) -----------------------

def test_paper_profile_follows_the_reference_optimisers():
    """LightningDiT's 64-epoch config has no max_grad_norm; VA-VAE's tokenizer uses Adam (0.5, 0.9) for the
    autoencoder and the discriminator, no weight decay, no scheduler, no clipping (profiles/imagenet256.yaml)."""
    p = load_params(ROOT / "profiles" / "imagenet256.yaml", check_paths=False)
    assert not p.dit.grad_clip and p.dit.lognormal_until is None
    for stage in (p.tokenizer.stage1, p.tokenizer.stage2, p.tokenizer.stage3):
        assert (stage.beta1, stage.beta2, stage.weight_decay, stage.grad_clip, stage.warmup_steps) == (0.5, 0.9, 0, 0, 0)
        assert (stage.disc_beta1, stage.disc_beta2, stage.disc_weight_decay, stage.disc_lr) == (0.5, 0.9, 0, stage.lr)


# --- item 6: LightningDiT's log-normal -> uniform switch (its t draws: test_flow_known_values.py) ------------------

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


# --- item 9: the discriminator and its optimiser state carry from stage to stage ---------------------------------------

def test_stage2_starts_from_stage1s_final_discriminator_and_its_adam_state(tmp_path, monkeypatch):
    from aligntok.losses import build_lpips
    from aligntok.stages.tokenizer import discriminator_dir, export_discriminator, stage_recipe
    from aligntok.train.loop import train
    from tests.test_tokenizer_stages import CPU, Images
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = AlignTokenizer(tok_config(pretrained="none"))
    stage1, cfg1 = recipe_for(1, model, disc_start=0, steps=3)
    train(stage1, Images(12), cfg1, dist=CPU, ckpt_dir=tmp_path / "c1", config_hash="h", seed=0)
    export_discriminator(stage1, 1, trained=True)
    final1 = {k: v.clone() for k, v in stage1.disc.state_dict().items()}
    moments1 = copy.deepcopy(stage1.optimizers()["discriminator"].state_dict()["state"])

    params = load_params(ROOT / "profiles" / "ci.yaml", ["tokenizer.stage2.disc_weight=0.1",
                                                         "tokenizer.stage2.disc_lr=3e-4", "tokenizer.stage2.steps=1"],
                         check_paths=False)
    target = copy.deepcopy(model).requires_grad_(False)
    stage2, init = stage_recipe(params, 2, model, target, build_lpips("vgg", pretrained_backbone=False), CPU.device)
    assert init == "carried from stage 1"
    seen = {}
    losses = stage2.losses

    def first_step(batch, step):  # the discriminator and its optimiser as the loop's step 0 finds them
        if step == 0:
            seen["disc"] = {k: v.clone() for k, v in stage2.disc.state_dict().items()}
            seen["opt"] = copy.deepcopy(stage2.optimizers()["discriminator"].state_dict())
        return losses(batch, step)
    stage2.losses = first_step
    train(stage2, Images(12), params.tokenizer.stage2.model_copy(update={"batch_size": 4}), dist=CPU,
          ckpt_dir=tmp_path / "c2", config_hash="h", seed=0)
    # bit-equal: float32 weights and moments written to safetensors / torch.save and read back unchanged
    assert seen["disc"].keys() == final1.keys() and all(torch.equal(seen["disc"][k], final1[k]) for k in final1)
    assert seen["opt"]["state"].keys() == moments1.keys()
    for i, st in moments1.items():
        assert int(seen["opt"]["state"][i]["step"]) == 3  # Adam's bias correction goes on from stage 1's 3 steps
        assert all(torch.equal(seen["opt"]["state"][i][k], st[k]) for k in ("exp_avg", "exp_avg_sq"))
    # the hyperparameters are stage 2's, not the ones saved with stage 1's state
    assert [(g["lr"], g["betas"]) for g in seen["opt"]["param_groups"]] == [(3e-4, (0.5, 0.9))]
    assert any(not torch.equal(v, final1[k]) for k, v in stage2.disc.state_dict().items())  # and it trained on

    # a stage without a GAN hands stage 1's on unchanged; without any export, a stage starts a random one
    export_discriminator(stage2, 2, trained=False)
    assert sorted(p.name for p in discriminator_dir(2).iterdir()) == ["discriminator.safetensors", "optimizer.pt"]
    assert (discriminator_dir(2) / "optimizer.pt").read_bytes() == (discriminator_dir(1) / "optimizer.pt").read_bytes()
    shutil.rmtree(discriminator_dir(1))
    assert stage_recipe(params, 2, model, target, None, CPU.device)[1] == "random"
    assert stage_recipe(params, 2, model, target, None, CPU.device)[0].disc is not None


# --- item 10: how strong semantic preservation is at the encoder ------------------------------------------------------

def _encoder_grads(recipe, batch):
    for p in recipe.model.parameters():
        p.grad = None
    recipe.losses(batch, 0)[0]["generator"].backward()
    return torch.cat([p.grad.flatten() for p in recipe.model.encoder.parameters() if p.grad is not None])


@pytest.mark.numeric
def test_sp_grad_ratio_is_the_weighted_sp_gradient_over_the_rest_at_the_encoder():
    torch.manual_seed(0)
    model = AlignTokenizer(tok_config(pretrained="none"))
    target = AlignTokenizer(tok_config(pretrained="none")).requires_grad_(False)  # not a copy: L_sp > 0
    from tests.test_tokenizer_stages import Images
    data = Images(4)
    batch = (torch.stack([data[i][0] for i in range(4)]), torch.zeros(4, dtype=torch.long))
    with_sp, _ = recipe_for(2, model, target, disc_start=1000, semantic_weight=3.0, log_every=1)
    without, _ = recipe_for(2, model, target, disc_start=1000, semantic_weight=0.0, log_every=1)
    logged = with_sp.losses(batch, 0)[1]["sp_grad_ratio"]
    # by hand, from the step's own backward: grad(rest + 3 L_sp) - grad(rest) = 3 grad(L_sp)
    full, rest = _encoder_grads(with_sp, batch), _encoder_grads(without, batch)
    by_hand = float((full - rest).norm() / rest.norm())
    # float32 gradients summed in another order: ~1e-6 relative; an unweighted L_sp is off by 3x, and a ratio over
    # the whole loss (rest + 3 L_sp) by the share of L_sp in it
    assert 0.01 < by_hand and logged == pytest.approx(by_hand, rel=1e-3)
    # logged only on the steps whose window is logged (step + 1 a multiple of log_every)
    every3, _ = recipe_for(2, model, target, disc_start=1000, semantic_weight=3.0, log_every=3)
    assert ["sp_grad_ratio" in every3.losses(batch, s)[1] for s in (0, 1, 2)] == [False, False, True]


@pytest.mark.numeric
def test_encoder_grad_ratio_known_value():
    from aligntok.stages.tokenizer import encoder_grad_ratio
    m = nn.Linear(2, 1, bias=False)
    w = m.weight
    # d/dw of (3, 4).w is (3, 4), norm 5; of (1, 0).w is (1, 0), norm 1: ratio 5, exact in float32
    assert encoder_grad_ratio((w * torch.tensor([3.0, 4.0])).sum(), (w * torch.tensor([1.0, 0.0])).sum(), m) == 5.0



def test_make_sweep_sp_queues_the_weight_by_encoder_lr_grid(recorded_repo):
    """`make sweep-sp`'s queue command, run in a recorded repo: one queued experiment per (weight, encoder lr)."""
    import re
    import subprocess
    from tests.test_dvc_native import queued_params
    from tests.test_pipeline import sh
    from tests.make_run import make
    dry = make("-n", "sweep-sp", "SP_WEIGHTS=0,2", "SP_ENCODER_LRS=1e-5,3e-5", check=True).stdout
    queue = next(c for c in dry.replace("\\\n", "").splitlines() if c.startswith("dvc exp run --queue"))
    try:
        proc = sh(["bash", "-c", queue], recorded_repo)
        assert len(re.findall(r"Queued experiment", proc.stdout + proc.stderr)) == 4, proc.stdout + proc.stderr
        pairs = {(q["tokenizer.stage2.semantic_weight"], q["tokenizer.stage2.encoder_lr"])
                 for q in queued_params(recorded_repo).values()}
        assert pairs == {(0, 1e-5), (0, 3e-5), (2, 1e-5), (2, 3e-5)}
    finally:
        sh(["dvc", "queue", "remove", "--all"], recorded_repo)
        sh(["git", "checkout", "--", "params.yaml"], recorded_repo)

# --- item 11: the probe curve starts at a real step 0, and final summaries stay off it ----------------------------------

class ProbedLinear(LinearRecipe):
    def __init__(self):
        super().__init__(lambda step: [1.0, 1.0], lr=0.5)
        self.probed = []

    def probe(self, step):
        self.probed.append((step, self.net.w.detach().clone()))
        return {"probe_fd": float(self.net.w[0].detach())}


class Tracker:
    run_id = None

    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, step=None):
        self.calls.append((dict(metrics), step))

    def log_image(self, *a, **k):
        pass


@pytest.mark.numeric
def test_the_untrained_model_is_probed_at_step_0_and_logged_there(tmp_path):
    from aligntok.train.loop import train
    from tests.test_train_known_values import CPU, DATA
    recipe, tracker = ProbedLinear(), Tracker()
    cfg = DitConfig(steps=4, batch_size=2, lr=0.5, probe_every=2, log_every=1, ckpt_every=100, grad_clip=0,
                    ema_decay=None)
    out = train(recipe, DATA, cfg, dist=CPU, ckpt_dir=tmp_path / "c", config_hash="h", seed=0, tracker=tracker)
    assert [s for s, _ in recipe.probed] == [0, 2, 4]
    # SGD, lr 0.5 on gradient 1: w[0] = 1 - 0.5 * step, exact in float64; step 0 is the initial weight, untouched
    assert [float(w[0]) for _, w in recipe.probed] == [1.0, 0.0, -1.0]
    probe_calls = [(m["probe_fd"], step) for m, step in tracker.calls if "probe_fd" in m]
    assert probe_calls == [(1.0, 0), (0.0, 2), (-1.0, 4)]  # every probe point carries its step
    assert out["history"][0] == {"step": 0, "probe_fd": 1.0}
    recipe = ProbedLinear()  # probe off: no baseline either
    train(recipe, DATA, cfg.model_copy(update={"probe_every": 0}), dist=CPU, ckpt_dir=tmp_path / "d",
          config_hash="h", seed=0)
    assert recipe.probed == []


def test_train_dit_summarises_the_last_probe_under_keys_that_are_not_curves():
    from aligntok.stages.dit import last_probe
    from aligntok.stages.study import CURVES
    hist = [{"step": 0, "probe_fd": 9.0, "probe_class_acc": 0.1}, {"step": 10, "loss": 1.0},
            {"step": 20, "loss": 0.5, "probe_fd": 2.0, "probe_class_acc": 0.6}]
    assert last_probe(hist) == {"last_probe_fd": 2.0, "last_probe_class_acc": 0.6, "last_probe_step": 20}
    assert not set(last_probe(hist)) & {key for key, _ in CURVES} and last_probe([{"step": 1, "loss": 1.0}]) == {}
