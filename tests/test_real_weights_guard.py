"""The conftest guard: a test without the real_weights marker cannot load real weights."""
from __future__ import annotations

import pytest
import torch

from encoders import families
from encoders.asr import AsrSpec
from encoders.specs import RANDOM, ModelSpec
from tests.conftest import _GUARD, TINY_CLIP_JSON, RealWeightsWithoutMarker, real_weights_in


def test_what_counts_as_real_weights(tiny_text_spec, tiny_whisper_dir, tmp_path_factory, tmp_path):
    root = tmp_path_factory.getbasetemp().resolve()
    # random weights, and the tiny fixtures saved under the session's temporary root: not real
    assert real_weights_in(ModelSpec("open_clip", TINY_CLIP_JSON, RANDOM), root) is None
    assert real_weights_in(tiny_text_spec, root) is None  # saved random weights, loaded as "pretrained"
    assert real_weights_in(AsrSpec("transformers", tiny_whisper_dir, RANDOM), root) is None
    assert real_weights_in(ModelSpec("conse", "efficientnet_lite0", RANDOM, text=tiny_text_spec), root) is None
    # a pretrained tag, a hub id, a faster-whisper size, a directory outside the temporary root: real
    assert "laion2b" in real_weights_in(ModelSpec("open_clip", "ViT-B-32", "laion2b_s34b_b79k"), root)
    assert real_weights_in(ModelSpec("hf_text", "sentence-transformers/all-MiniLM-L6-v2"), root)
    assert real_weights_in(AsrSpec("faster_whisper", "tiny.en"), root)
    assert real_weights_in(ModelSpec("hf_text", str(families.__file__).rsplit("/", 1)[0]), root)
    # a bridge is real when its text model is, whatever its classifier
    real_text = ModelSpec("hf_text", "sentence-transformers/all-MiniLM-L6-v2")
    assert "all-MiniLM" in real_weights_in(ModelSpec("conse", "efficientnet_lite0", RANDOM, text=real_text), root)


def test_a_real_load_without_the_marker_is_stopped(request):
    with pytest.raises(RealWeightsWithoutMarker, match="must be marked real_weights"):
        families.load(ModelSpec("hf_text", "sentence-transformers/all-MiniLM-L6-v2"), torch.device("cpu"))
    # the guard recorded it, so the test fails at teardown even if the error had been caught on the way;
    # this test clears the record: the stop itself is what it checks
    assert "all-MiniLM" in " ".join(_GUARD.pop(request.node.nodeid))


@pytest.mark.real_weights
def test_a_marked_test_passes_the_guard(request):
    spec = ModelSpec("hf_text", "sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(Exception) as raised:  # offline: the hub cannot answer, but the guard let it through
        families.load(spec, torch.device("cpu"))
    assert not isinstance(raised.value, RealWeightsWithoutMarker)
    assert request.node.nodeid not in _GUARD
