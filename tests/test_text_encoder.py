"""The frozen text encoder: static shapes, a prefix mask, padding zeroed, a caption's states independent of its batch
and of padding (the packaged all-MiniLM-L6-v2 against transformers run on the unpadded caption), random-init models
of each family loaded by path, the identity hash, and one-line errors."""
import shutil

import pytest
import torch
from torch.testing import assert_close

from aligntok.bench.text import synthetic_captions
from aligntok.models.text_encoder import PACKAGED, TextEncoder, TextEncoderError, resolve_text_encoder
from tests.conftest import single_thread

# Caption states of MiniLM (magnitudes up to ~6.3) computed at other sequence lengths (the encoder runs at its
# batch's longest caption): the GEMMs and softmax are blocked differently, which reorders fp32 sums. Measured
# <= 3.2e-6 apart (a caption alone vs in a batch, vs transformers on it unpadded; on 1 and 2 threads). atol 5e-5
# leaves 15x margin; a leak of padding into the caption (no attention mask) moves the states by > 0.05, 1000x the
# tolerance (checked below).
PADDING = dict(rtol=1e-5, atol=5e-5)
CAPTIONS = synthetic_captions(12, seed=3) + ["a cat", "", "word " * 60]  # short, empty, cut at max_tokens
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def minilm():
    with single_thread():
        yield TextEncoder.load(PACKAGED, 32)


def test_shapes_are_static_mask_is_the_tokens_and_padding_is_zero(minilm):
    hidden, mask = minilm.encode(CAPTIONS)
    assert hidden.shape == (len(CAPTIONS), 32, 384) and hidden.dtype == torch.float32 and minilm.dim == 384
    assert mask.shape == (len(CAPTIONS), 32) and mask.dtype == torch.bool
    for i, caption in enumerate(CAPTIONS):
        n = len(minilm.tokenizer(caption, truncation=True, max_length=32)["input_ids"])
        assert torch.equal(mask[i], torch.arange(32) < n)  # [CLS] words [SEP], then padding
    assert mask[-1].all() and mask[-2].sum() == 2  # the long caption is cut at 32, the empty one is [CLS] [SEP]
    assert (hidden[~mask] == 0).all() and (hidden[mask].abs().sum(-1) > 0).all()
    h1, m1 = minilm.encode(["a cat"])
    assert h1.shape == (1, 32, 384) and m1.shape == (1, 32)  # one short caption: still 32 positions


def test_a_caption_does_not_depend_on_its_batch_or_padding(minilm):
    from transformers import AutoModel
    hidden, mask = minilm.encode(CAPTIONS)
    rev_h, rev_m = minilm.encode(CAPTIONS[::-1])
    assert_close(rev_h.flip(0), hidden, **PADDING) and torch.equal(rev_m.flip(0), mask)
    for i, caption in enumerate(CAPTIONS[:4]):
        alone, _ = minilm.encode([caption])
        assert_close(alone[0], hidden[i], **PADDING)
    shorter = TextEncoder(minilm.model, minilm.tokenizer, 16, "cpu", PACKAGED, minilm.folder, "h")
    h16, m16 = shorter.encode(CAPTIONS)
    fits = [i for i in range(len(CAPTIONS)) if mask[i].sum() <= 16]
    assert len(fits) >= 3
    assert_close(h16[fits], hidden[fits, :16], **PADDING) and torch.equal(m16[fits], mask[fits, :16])
    # transformers itself on each caption alone, unpadded: no padding anywhere
    reference = AutoModel.from_pretrained(minilm.folder).eval()
    leak = 0.0
    for i, caption in enumerate(CAPTIONS):
        ids = minilm.tokenizer(caption, truncation=True, max_length=32, return_tensors="pt")
        n = ids["input_ids"].shape[1]
        with torch.no_grad():
            ref = reference(**ids).last_hidden_state[0]
            padded = minilm.tokenizer(caption, padding="max_length", truncation=True, max_length=32,
                                      return_tensors="pt")
            unmasked = reference(input_ids=padded["input_ids"]).last_hidden_state[0, :n]
        assert_close(hidden[i, :n], ref, **PADDING)
        leak = max(leak, (unmasked - ref).abs().max().item())
    assert leak > 1000 * PADDING["atol"]  # the tolerance would catch padding the encoder attended to


def test_the_encoder_is_frozen(minilm):
    assert not minilm.model.training and not any(p.requires_grad for p in minilm.model.parameters())
    hidden, _ = minilm.encode(["a cat"])
    assert not hidden.requires_grad


def _save_tiny(folder, family: str):
    """A random-init model of `family` with the MiniLM tokenizer files (its vocabulary of 30522) in `folder`."""
    import transformers as tf
    torch.manual_seed(0)
    small = dict(vocab_size=30522)
    if family == "bert":
        model = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, **small))
    elif family == "t5":  # a whole encoder-decoder, as T5 checkpoints are published
        model = tf.T5ForConditionalGeneration(tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                          decoder_start_token_id=0, **small))
    elif family == "clip":  # a whole dual encoder; the text tower is taken
        model = tf.CLIPModel(tf.CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             max_position_embeddings=40, **small),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=16)))
    else:  # decoder-only
        model = tf.GemmaModel(tf.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                             pad_token_id=0, **small))
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(resolve_text_encoder(PACKAGED) + "/" + name, folder / name)
    return folder


@pytest.mark.parametrize("family,arch", [("bert", "BertModel"), ("t5", "T5EncoderModel"),
                                         ("clip", "CLIPTextModel"), ("gemma", "GemmaModel")])
def test_random_init_models_of_each_family_load_by_path(tmp_path, one_thread, family, arch):
    folder = _save_tiny(tmp_path / family, family)
    enc = TextEncoder.load(str(folder), 24)
    assert type(enc.model).__name__ == arch and enc.dim == 32
    hidden, mask = enc.encode(CAPTIONS)
    assert hidden.shape == (len(CAPTIONS), 24, 32) and mask.shape == (len(CAPTIONS), 24)
    assert (hidden[~mask] == 0).all() and torch.isfinite(hidden).all()
    for i in (0, len(CAPTIONS) - 3):  # a caption's states do not depend on its batch
        alone, m = enc.encode([CAPTIONS[i]])
        assert_close(alone[0], hidden[i], **PADDING) and torch.equal(m[0], mask[i])


def test_the_hash_follows_contents_and_settings_not_the_path(tmp_path, one_thread):
    folder = _save_tiny(tmp_path / "a", "bert")
    h = TextEncoder.load(str(folder), 24).hash
    shutil.copytree(folder, tmp_path / "b")
    assert TextEncoder.load(str(tmp_path / "b"), 24).hash == h  # a moved copy keeps its cache
    assert TextEncoder.load(str(folder), 16).hash != h  # max_tokens is part of what is cached
    (tmp_path / "b" / "vocab.txt").write_text((folder / "vocab.txt").read_text().replace("cat", "kat"))
    assert TextEncoder.load(str(tmp_path / "b"), 24).hash != h  # another tokenizer tokenizes otherwise


def test_resolve_and_load_errors_are_one_line(tmp_path):
    assert resolve_text_encoder(PACKAGED).endswith("model")
    (tmp_path / "config.json").touch()
    assert resolve_text_encoder(str(tmp_path)) == str(tmp_path)  # a local folder is itself
    (tmp_path / "config.json").unlink()
    cases = {"google/not-a-cached-model-xyz": "not in the local Hugging Face cache",
             str(tmp_path): "has no config.json", "../nowhere": "neither an existing folder nor a Hugging Face id"}
    for name, what in cases.items():
        with pytest.raises(TextEncoderError, match=what) as e:
            resolve_text_encoder(name)
        assert "\n" not in str(e.value) and str(e.value).startswith("text.encoder: ")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TextEncoderError, match=r"no \*.safetensors weights; expected safetensors") as e:
        TextEncoder.load(str(tmp_path), 32)
    assert "\n" not in str(e.value)


def test_max_tokens_beyond_the_model_positions_is_one_line(tmp_path, one_thread):
    folder = _save_tiny(tmp_path / "clip", "clip")  # 40 positions
    with pytest.raises(TextEncoderError, match=r"^text.max_tokens: given 64; expected at most 40") as e:
        TextEncoder.load(str(folder), 64)
    assert "\n" not in str(e.value)
