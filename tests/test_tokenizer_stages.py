"""The three tokenizer stage recipes on real modules: trainable sets, semantic preservation, training effect."""
import numpy as np
import pytest
import torch

from aligntok.config import Stage2Config, TokenizerStageConfig
from aligntok.eval.reconstruction import reconstruction_metrics
from aligntok.losses import ReconstructionLoss, build_lpips
from aligntok.models.discriminator import PatchDiscriminator
from aligntok.models.tokenizer import AlignTokenizer
from aligntok.stages.tokenizer import TokenizerRecipe, trainable_parts
from aligntok.train.dist import DistInfo
from aligntok.train.loop import train

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
RES = 32

# Training outcomes depend on the summation order, which depends on the thread count: one thread makes them
# independent of the machine's cores and OMP_NUM_THREADS (and is 5-10x faster on 2 shared cores).
pytestmark = pytest.mark.usefixtures("one_thread")


def tok_config(kind="aligntok", pretrained="efficientnet-lite0"):
    return {"kind": kind, "encoder_arch": "tf_efficientnet_lite0", "encoder_pretrained": pretrained,
            "image_size": RES, "latent_channels": 8, "size": "tiny", "kl": kind == "vae", "adapter_hidden": 32}


class Images(torch.utils.data.Dataset):
    """Synthetic class-labelled images from the data module, decoded like the training shards."""

    def __init__(self, n, offset=0):
        from aligntok.data.synthetic import synthetic_image
        imgs = [np.asarray(synthetic_image(offset + i, (offset + i) % 10, RES, seed=0)) for i in range(n)]
        self.x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
        self.y = [(offset + i) % 10 for i in range(n)]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def recipe_for(stage, model, target=None, kind="aligntok", disc_start=0, **cfg_kw):
    cls = Stage2Config if stage == 2 else TokenizerStageConfig
    base = dict(steps=4, batch_size=4, lr=1e-3, disc_start=disc_start, disc_weight=0.1, lpips_weight=0.1,
                ckpt_every=1000)
    cfg = cls(**{**base, **cfg_kw})
    lp = build_lpips("vgg", pretrained_backbone=False)
    disc = PatchDiscriminator()
    loss = ReconstructionLoss(lp, l1_weight=1.0, lpips_weight=0.1, kl_weight=1e-6 if kind == "vae" else 0.0,
                              disc_weight=0.1, disc_start=disc_start, discriminator=disc)
    return TokenizerRecipe(model, disc, loss, cfg, stage, kind, target), cfg


def param_ids(module):
    return {id(p) for p in module.parameters()}


@pytest.mark.parametrize("stage, parts", [(1, {"adapter", "decoder"}), (2, {"encoder", "adapter", "decoder"}),
                                          (3, {"decoder"})])
def test_exact_trainable_set_and_no_gradient_into_frozen_modules(stage, parts):
    torch.manual_seed(0)
    model = AlignTokenizer(tok_config(pretrained="none"))
    target = AlignTokenizer(tok_config(pretrained="none")).requires_grad_(False) if stage == 2 else None
    recipe, _ = recipe_for(stage, model, target)
    assert trainable_parts("aligntok", stage) == parts
    opt_params = {id(p) for g in recipe.optimizers()["generator"].param_groups for p in g["params"]}
    expected = set().union(*(param_ids(getattr(model, n)) for n in parts))
    assert opt_params == expected
    x = torch.stack([Images(4)[i][0] for i in range(4)])
    losses, _ = recipe.losses((x, torch.zeros(4, dtype=torch.long)), step=1)
    losses["generator"].backward()
    for name in ("encoder", "adapter", "decoder"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        if name in parts:
            assert any(g is not None and g.abs().sum() > 0 for g in grads), name
        else:
            assert all(g is None for g in grads), name
    assert all(p.grad is None for p in recipe.disc.parameters())  # generator loss leaves the discriminator alone
    losses["discriminator"].backward()
    assert any(p.grad is not None for p in recipe.disc.parameters())


def test_stage2_uses_encoder_lr_for_the_encoder():
    model = AlignTokenizer(tok_config(pretrained="none"))
    recipe, cfg = recipe_for(2, model, AlignTokenizer(tok_config(pretrained="none")), encoder_lr=3e-6)
    lrs = {g["name"]: g["lr"] for g in recipe.optimizers()["generator"].param_groups}
    assert lrs == {"encoder": 3e-6, "adapter": cfg.lr, "decoder": cfg.lr}


def test_semantic_preservation_is_zero_at_first_step_of_stage2(tmp_path):
    stage1 = AlignTokenizer(tok_config())
    stage1.save_pretrained(tmp_path / "s1")
    model = AlignTokenizer.from_pretrained(tmp_path / "s1")
    target = AlignTokenizer.from_pretrained(tmp_path / "s1").eval().requires_grad_(False)
    recipe, _ = recipe_for(2, model, target, semantic_weight=1.0)
    x = torch.stack([Images(4)[i][0] for i in range(4)])
    _, logs = recipe.losses((x, torch.zeros(4, dtype=torch.long)), step=0)
    # the same weights (BN frozen in both) on the same batch in one process: identical latents, so exactly 0
    assert logs["semantic_preservation"] == 0.0


def _psnr(model, data):
    return reconstruction_metrics(model, data, num_images=len(data), device=torch.device("cpu"))["psnr"]


def test_stage1_raises_val_psnr_and_stage3_keeps_it(tmp_path, kind="aligntok"):
    torch.manual_seed(0)
    train_set, val_set = Images(64), Images(16, offset=1000)
    model = AlignTokenizer(tok_config(kind))
    before = _psnr(model, val_set)
    recipe, cfg = recipe_for(1, model, kind=kind, disc_start=10_000, steps=100, batch_size=8, lr=2e-3)
    train(recipe, train_set, cfg, dist=CPU, ckpt_dir=tmp_path / "s1", config_hash="a", seed=0)
    after1 = _psnr(model, val_set)
    # measured 10.28 -> 13.20 / 13.25 dB (+2.92 / +2.97) with ATEN_CPU_CAPABILITY=default / avx2 on one thread,
    # +3.13 / +2.83 on two: +1.5 dB leaves >1.3 dB for other kernels while still needing real learning
    assert after1 > before + 1.5, (before, after1)
    recipe3, cfg3 = recipe_for(3, model, kind=kind, disc_start=10_000, steps=30, batch_size=8, lr=5e-4)
    train(recipe3, train_set, cfg3, dist=CPU, ckpt_dir=tmp_path / "s3", config_hash="b", seed=1)
    after3 = _psnr(model, val_set)
    assert after3 > after1 - 0.5, (after1, after3)  # measured +0.30 / +0.23 dB (one thread), +0.11 / +0.36 (two)


def test_from_scratch_vae_trains_through_the_same_loop(tmp_path):
    torch.manual_seed(0)
    model = AlignTokenizer(tok_config("vae"))
    val_set = Images(16, offset=1000)
    before = _psnr(model, val_set)
    recipe, cfg = recipe_for(1, model, kind="vae", disc_start=10_000, steps=40, batch_size=8, lr=2e-3, log_every=10)
    train(recipe, Images(64), cfg, dist=CPU, ckpt_dir=tmp_path / "vae", config_hash="v", seed=0)
    assert trainable_parts("vae", 1) == {"encoder", "adapter", "decoder"}
    # The logged loss plateaus within the first 10-step window (0.435 -> 0.390 = 0.896 / 0.900 of it under
    # default / avx2 kernels: no margin against a 0.9 bound), so the held-out PSNR is the measure instead:
    # measured 10.41 -> 13.11 / 12.80 dB (+2.70 / +2.39) under default / avx2 kernels on one thread.
    after = _psnr(model, val_set)
    assert after > before + 1.0, (before, after)
    assert model.encode(Images(2)[0][0][None]).shape == (1, 8, RES // 16, RES // 16)


def test_tokenizer_stage_resume_gives_the_same_weights(tmp_path):
    """Stage 2 (everything trains, GAN on, EMA) interrupted after step 3 and resumed == uninterrupted."""
    from aligntok.train.checkpoint import find_checkpoint

    def run(name, stop_after=None):
        torch.manual_seed(0)
        model = AlignTokenizer(tok_config(pretrained="none"))
        target = AlignTokenizer(tok_config(pretrained="none")).eval().requires_grad_(False)
        torch.manual_seed(1)
        recipe, cfg = recipe_for(2, model, target, steps=6, batch_size=4, ckpt_every=2, ema_decay=0.9)
        return model, train(recipe, Images(16), cfg, dist=CPU, ckpt_dir=tmp_path / name, config_hash="h", seed=0,
                            hflip=True, resume=find_checkpoint(tmp_path / name, "h"), stop_after=stop_after)

    full, full_out = run("a")
    with pytest.raises(KeyboardInterrupt):
        run("b", stop_after=3)
    resumed, res_out = run("b")
    # resume restores every state exactly and replays the same ops in the same process: bit-identical by
    # construction (measured 0 for weights and EMA under default/avx2 kernels)
    for (n, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), n
    for p, q in zip(full_out["ema"]["tokenizer"].parameters(), res_out["ema"]["tokenizer"].parameters()):
        assert torch.equal(p, q)
