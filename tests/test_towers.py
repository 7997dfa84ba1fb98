"""Model towers on tiny random configs: shapes, unit norms, batch invariance, fingerprints."""
import numpy as np
import pytest
import torch

from encoders import towers
from encoders.specs import ModelSpec, fingerprint

CPU = torch.device("cpu")
TEXTS = ["red ceramic mug", "红色陶瓷杯", "a model rocket kit with a long description " * 6, "x", "blue bag"]


def _assert_unit(v, dim):
    assert v.shape[1] == dim and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)


def _check_batch_invariance(encode, inputs):
    whole = encode(inputs, 4)
    singles = np.concatenate([encode(inputs[i:i + 1], 4) for i in range(len(inputs))])
    reordered = encode(inputs[::-1], 4)[::-1]
    assert np.array_equal(whole, singles), "an item's vector must not depend on its batch-mates"
    assert np.array_equal(whole, reordered)


def test_open_clip_towers(tiny_clip_spec):
    model = towers.load(tiny_clip_spec, CPU)
    assert towers.load(tiny_clip_spec, CPU) is model  # one copy per process and device
    pixels = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    _assert_unit(model.encode_image(pixels, 4), 16)
    _assert_unit(model.encode_text(TEXTS, 4), 16)
    _check_batch_invariance(model.encode_image, pixels)
    _check_batch_invariance(model.encode_text, TEXTS)
    assert towers.output_dim(tiny_clip_spec) == 16
    assert towers.image_preprocess(tiny_clip_spec).size == 32


def test_random_init_is_seeded_and_reproducible(tiny_clip_spec):
    a = towers.OpenClipModel(tiny_clip_spec, CPU).encode_text(TEXTS, 8)
    b = towers.OpenClipModel(tiny_clip_spec, CPU).encode_text(TEXTS, 8)
    c = towers.OpenClipModel(ModelSpec("open_clip", tiny_clip_spec.name, "random", seed=1), CPU).encode_text(TEXTS, 8)
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_sentence_encoder_mean_pooling(tiny_text_spec):
    model = towers.load(tiny_text_spec, CPU)
    out = model.encode_text(TEXTS, 4)
    _assert_unit(out, 32)
    _check_batch_invariance(model.encode_text, TEXTS)
    # mean pooling by hand over the unpadded tokens
    enc = model.tokenizer([TEXTS[0]], return_tensors="pt")
    with torch.inference_mode():
        hidden = model.model(**enc).last_hidden_state[0]
    manual = hidden.mean(0).numpy()
    np.testing.assert_allclose(out[0], manual / np.linalg.norm(manual), atol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "chinese_clip", "siglip"])
def test_transformers_clip_families(tiny_hf_clip_dirs, kind):
    spec = ModelSpec("hf_clip", tiny_hf_clip_dirs[kind], "pretrained")
    model = towers.HfClipModel(spec, CPU)
    dim = towers.output_dim(spec)
    pre = towers.image_preprocess(spec)
    assert pre.size == 32 and pre.resize == ("squash" if kind == "siglip" else "shortest")
    pixels = np.random.default_rng(1).normal(size=(3, 3, 32, 32)).astype(np.float32)
    _assert_unit(model.encode_image(pixels, 2), dim)
    _assert_unit(model.encode_text(TEXTS, 2), dim)
    _check_batch_invariance(model.encode_text, TEXTS)


def test_fingerprint_tracks_weights_and_architecture(tiny_text_dir, tiny_clip_spec, tmp_path):
    a = fingerprint(ModelSpec("hf_text", tiny_text_dir, "pretrained"))
    b = fingerprint(ModelSpec("hf_text", tiny_text_dir, "random"))
    assert a != b
    assert fingerprint(tiny_clip_spec) != fingerprint(ModelSpec("open_clip", "ViT-B-32", "random"))
    spec = ModelSpec("open_clip", "ViT-B-32", "random")
    assert spec.describe()["weights_label"] == "random"
    assert ModelSpec("open_clip", "ViT-B-32", "laion2b_s34b_b79k").weights_label == "real"


def test_spec_validation_names_valid_values():
    with pytest.raises(ValueError, match="not one of"):
        ModelSpec("keras", "m")
    with pytest.raises(ValueError, match="pretrained tag, a checkpoint path or 'random'"):
        ModelSpec("open_clip", "ViT-B-32")
    with pytest.raises(ValueError, match="'pretrained'"):
        ModelSpec("hf_text", "m", "laion")
