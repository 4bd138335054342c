"""tokenizer.kind external: a pretrained diffusers AutoencoderKL as the tokenizer (aligntok.models.external).

Offline throughout, with a small random-init AutoencoderKL saved to a temporary folder in place of the FLUX VAE:
the interface (encode = the posterior mean, decode, shapes), the tokenizer folder's save/load round trip, weight
resolution (local folder, subfolder, a cached Hugging Face id, one-line failures), and the CLI stages on the ci
profile: stage 1 writes the folder, stages 2 and 3 pass it on, cache-latents and a class-conditional DiT take it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from aligntok.models.external import (VAE_WEIGHTS, ExternalLoadError, ExternalTokenizer, file_sha256,
                                      resolve_external_vae)
from aligntok.models.tokenizer import AlignTokenizer, TokenizerLoadError
from tests.conftest import ROOT
from tests.test_bad_inputs import _fails_in_one_line
from tests.test_pipeline import ci_copy, sh

pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identical CPU numbers whatever the core count
RES = 32
EXACT = dict(rtol=0.0, atol=1e-6)  # same weights, same ops, one thread: equal up to float32 rounding (1e-6 abs)


def small_vae(seed: int = 0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=4, sample_size=RES).eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A diffusers pipeline-like folder: the VAE in its `vae` subfolder, as in black-forest-labs/FLUX.1-dev."""
    root = tmp_path_factory.mktemp("external") / "pipeline"
    small_vae().save_pretrained(str(root / "vae"), safe_serialization=True)
    return root


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, RES, RES, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_is_the_posterior_mean_and_decode_returns_images(source):
    from diffusers import AutoencoderKL
    tok = ExternalTokenizer.from_source(str(source), "vae", RES)
    ref = AutoencoderKL.from_pretrained(str(source / "vae")).eval()
    x = images()
    with torch.no_grad():
        z, mean = tok.encode(x), ref.encode(x).latent_dist.mean
        rec = tok.decode(z)
    assert z.shape == (2, 4, RES // 2, RES // 2) and rec.shape == x.shape
    torch.testing.assert_close(z, mean, **EXACT)
    assert (tok.latent_channels, tok.latent_stride, tok.grid_size) == (4, 2, RES // 2)
    assert tok.config["external_digest"] == "sha256:" + file_sha256(source / "vae" / VAE_WEIGHTS)
    with torch.no_grad():
        assert torch.equal(tok.encode(x), z)  # deterministic: no posterior sample
        assert not torch.equal(tok.encode(x, sample=True), z)  # sampling is there when asked for
    assert not any(p.requires_grad for p in tok.parameters())
    assert not tok.train().training  # frozen and in eval mode whatever a caller asks


def test_folder_round_trip_gives_identical_outputs_and_a_stable_hash(source, tmp_path):
    from aligntok.fingerprint import file_hash, tokenizer_hash
    tok = ExternalTokenizer.from_source(str(source), "vae", RES)
    tok.save_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert config["kind"] == "external" and config["external"] == str(source)
    assert config["external_subfolder"] == "vae" and config["external_digest"].startswith("sha256:")
    loaded = AlignTokenizer.from_pretrained(tmp_path / "tok")  # every caller's loader takes the folder
    assert isinstance(loaded, ExternalTokenizer) and loaded.config == tok.config
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), tok.encode(x))
        assert torch.equal(loaded.decode(tok.encode(x)), tok.decode(tok.encode(x)))
    weights = tmp_path / "tok" / "vae" / VAE_WEIGHTS
    assert tokenizer_hash(tmp_path / "tok") == file_hash(weights)
    loaded.save_pretrained(tmp_path / "again")  # a pass-through stage re-saves: the same bytes, the same hash
    assert tokenizer_hash(tmp_path / "again") == tokenizer_hash(tmp_path / "tok")


def test_the_registered_mlflow_model_encodes_with_it(source, tmp_path):
    """Stage 3 registers the tokenizer folder as an MLflow pyfunc model: its predict encodes with the external VAE."""
    from types import SimpleNamespace

    from aligntok.tracking.registry_model import ExportedModel
    model = ExportedModel()  # mlflow warns that predict has no type hints: that is registry_model's, as it was
    tok = ExternalTokenizer.from_source(str(source), "vae", RES)
    tok.save_pretrained(tmp_path / "tok")
    model.load_context(SimpleNamespace(artifacts={"export": str(tmp_path / "tok")}))
    x = images()
    with torch.no_grad():
        assert torch.equal(torch.from_numpy(model.predict(None, x.numpy())), tok.encode(x))


def test_a_damaged_folder_is_one_line(source, tmp_path):
    from safetensors.torch import load_file, save_file
    ExternalTokenizer.from_source(str(source), "vae", RES).save_pretrained(tmp_path / "tok")
    weights = tmp_path / "tok" / "vae" / VAE_WEIGHTS
    tensors = load_file(str(weights))
    save_file({k: v for i, (k, v) in enumerate(tensors.items()) if i % 2}, str(weights))
    with pytest.raises(TokenizerLoadError, match="does not match") as e:
        AlignTokenizer.from_pretrained(tmp_path / "tok")
    assert "\n" not in str(e.value) and "missing" in str(e.value)
    weights.unlink()
    with pytest.raises(TokenizerLoadError, match=VAE_WEIGHTS):
        AlignTokenizer.from_pretrained(tmp_path / "tok")


def test_resolution_failures_are_one_line_naming_the_param(source, tmp_path):
    cases = [(str(tmp_path / "nowhere"), None, "not found"),
             (str(source), None, "set tokenizer.external_subfolder: vae"),  # the pipeline root, not its vae/
             (str(source), "text_encoder", "no config.json"),
             ("some-org/not-cached-vae", "vae", "not in the local Hugging Face cache")]
    for value, sub, needle in cases:
        with pytest.raises(ExternalLoadError) as e:
            resolve_external_vae(value, sub)
        msg = str(e.value)
        assert msg.startswith("tokenizer.external: ") and needle in msg and "\n" not in msg, msg
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ExternalLoadError, match="is a UNet2DModel; expected an AutoencoderKL"):
        resolve_external_vae(str(tmp_path / "unet"))


def test_a_cached_hub_id_resolves_offline(source, tmp_path, monkeypatch):
    """A Hugging Face id in the hub cache (the layout `hf download` leaves) is found with no network."""
    import shutil

    import huggingface_hub.constants as hub
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-dev"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    shutil.copytree(source / "vae", repo / "snapshots" / rev / "vae")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_external_vae("black-forest-labs/FLUX.1-dev", "vae") == repo / "snapshots" / rev / "vae"
    tok = ExternalTokenizer.from_source("black-forest-labs/FLUX.1-dev", "vae", RES)
    assert tok.config["external"] == "black-forest-labs/FLUX.1-dev" and tok.latent_channels == 4


def test_preflight_resolves_the_external_vae_for_stage_1_and_sizes_its_latents(source, tmp_path):
    from aligntok.config import load_params
    from aligntok.preflight import PreflightError, require_stage, weight_checks, weight_needs
    from aligntok.preflight_disk import disk_estimate, latent_geometry, parameter_counts
    base = load_params(ROOT / "profiles" / "ci.yaml")
    ext = base.model_copy(update={"tokenizer": base.tokenizer.model_copy(update={
        "kind": "external", "external": str(source), "external_subfolder": "vae"})})
    assert "tokenizer.external" in weight_needs("tokenizer-stage1", ext)
    assert "encoder.pretrained" not in weight_needs("tokenizer-stage1", ext)  # nothing of the encoder is loaded
    assert "tokenizer.external" not in weight_needs("tokenizer-stage2", ext)  # later stages read the saved folder
    require_stage("tokenizer-stage1", ext)
    [check] = [c for c in weight_checks(ext, ["tokenizer-stage1"]) if c.name == "weights tokenizer.external"]
    assert check.ok and str(source / "vae") in check.detail
    assert latent_geometry(ext) == (4, 2) and parameter_counts(ext)[0] == 0  # the VAE's latents; it never trains
    assert disk_estimate(ext, ROOT / "profiles", ROOT)[0] > 0
    bad = ext.model_copy(update={"tokenizer": ext.tokenizer.model_copy(update={"external": str(tmp_path / "x")})})
    with pytest.raises(PreflightError, match=r"^tokenizer\.external: .*x not found"):
        require_stage("tokenizer-stage1", bad)


# --- the CLI stages on the ci profile (class task) ----------------------------------------------------------------

def test_cli_missing_external_folder_stops_before_step_0(tmp_path):
    """Offline, a tokenizer.external folder that is not there: exit 2 and one line before anything runs."""
    import os
    import subprocess
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-m", "aligntok.cli", "tokenizer-stage1", "--params",
                           str(ROOT / "profiles" / "ci.yaml"), "-S", "tokenizer.kind=external",
                           "-S", f"tokenizer.external={tmp_path / 'gone'}"], cwd=work, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}, timeout=600)
    line = _fails_in_one_line(proc, "tokenizer-stage1: preflight: tokenizer.external:", "gone", "not found")
    assert "expected a local diffusers AutoencoderKL folder" in line
    assert list(work.iterdir()) == []  # no checkpoints/, outputs/, mlruns or mlflow.db: nothing ran


@pytest.fixture(scope="module")
def staged(tmp_path_factory, source):
    """A ci-profile repo copy, prepared, through tokenizer-stage1..3 and cache-latents with the external VAE."""
    repo, env = ci_copy(tmp_path_factory.mktemp("ext-cli"), OMP_NUM_THREADS="1")  # one thread, as the tests
    overrides = ["-S", "tokenizer.kind=external", "-S", f"tokenizer.external={source}",
                 "-S", "tokenizer.external_subfolder=vae"]

    def cli(stage, *extra):
        return sh([sys.executable, "-m", "aligntok.cli", stage, *overrides, *extra], repo, env)
    sh([sys.executable, "-m", "aligntok.cli", "prepare"], repo, env)
    metrics = {}
    for stage in ("tokenizer-stage1", "tokenizer-stage2", "tokenizer-stage3"):
        cli(stage)
        metrics[stage] = json.loads((repo / f"outputs/metrics/{stage}.json").read_text())
    cli("cache-latents")
    return repo, cli, metrics


def test_cli_stages_write_a_folder_cache_latents_takes(staged, source):
    from aligntok.fingerprint import tokenizer_hash
    repo, _, metrics = staged
    for stage, m in metrics.items():  # not trained, measured: the baseline's reconstruction numbers
        assert m["steps"] == 0 and m["psnr"] > 0 and m["rfid"] >= 0 and m["num_images"] > 0, (stage, m)
        assert m["semantic_cosine"] == pytest.approx(1.0)
    assert metrics["tokenizer-stage1"]["psnr"] == metrics["tokenizer-stage3"]["psnr"]
    tok = repo / "outputs/tokenizer"
    config = json.loads((tok / "stage3/model/config.json").read_text())
    assert config["kind"] == "external" and config["external"] == str(source)
    assert config["external_digest"] == "sha256:" + file_sha256(source / "vae" / VAE_WEIGHTS)
    assert tokenizer_hash(tok / "stage1/model") == tokenizer_hash(tok / "stage3/model")  # passed through
    assert not (tok / "stage1/discriminator").exists() and not (repo / "checkpoints/tokenizer-stage1").exists()
    manifest = json.loads((repo / "outputs/latents/manifest.json").read_text())
    assert manifest["tokenizer_hash"] == tokenizer_hash(tok / "stage3/model")
    assert manifest["latent_shape"] == [4, RES // 2, RES // 2] and len(manifest["latent_stats"]["std"]) == 4


@pytest.mark.slow
def test_cli_class_dit_samples_through_the_external_vae(staged):
    """The class path on: a DiT trained a few steps on the cached latents, sampled, decoded by the external VAE."""
    from aligntok.config import SampleConfig
    from aligntok.generate import load_generator, sample_labels
    repo, cli, _ = staged
    cli("train-dit", "-S", "dit.steps=2", "-S", "dit.probe_every=0", "-S", "dit.warmup_steps=0")
    tok = repo / "outputs/tokenizer/stage3/model"
    gen = load_generator(repo / "outputs/dit/model", tok, torch.device("cpu"))
    assert isinstance(gen.tokenizer, ExternalTokenizer)
    num_classes = json.loads((repo / "outputs/latents/manifest.json").read_text())["num_classes"]
    x = gen.images(sample_labels([0, 1], num_classes, "balanced", 0), [0, 1], SampleConfig(steps=2))
    assert x.shape == (2, 3, RES, RES) and torch.isfinite(x).all()
