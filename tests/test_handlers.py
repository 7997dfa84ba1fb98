"""ModelHandlers: batching contract and per-item failure isolation."""
import numpy as np
import pytest

from encoders.handlers import EncodeFailure, ImageEmbeddingHandler, TextEmbeddingHandler
from encoders.specs import ModelSpec
from schemas.dead_letter import Reason


class _FakeTextModel:
    """Fails any batch containing 'boom'; returns NaN for 'nan'."""

    dim = 3

    def encode_text(self, texts, batch_size):
        if "boom" in texts:
            raise RuntimeError("kaboom")
        out = np.tile(np.array([1, 0, 0], np.float32), (len(texts), 1))
        out[[i for i, t in enumerate(texts) if t == "nan"]] = np.nan
        return out


def test_one_bad_item_does_not_fail_its_batch():
    handler = TextEmbeddingHandler(ModelSpec("hf_text", "fake", "random"), device="cpu", batch_size=8)
    results = list(handler.run_inference(["a", "boom", "nan", "b"], _FakeTextModel()))
    assert [r.example for r in results] == ["a", "boom", "nan", "b"]
    ok = [r for r in results if isinstance(r.inference, np.ndarray)]
    failed = {r.example: r.inference for r in results if isinstance(r.inference, EncodeFailure)}
    assert len(ok) == 2
    assert failed["boom"].reason is Reason.ENCODE_FAILED and "kaboom" in failed["boom"].detail
    assert failed["nan"].reason is Reason.NONFINITE_VECTOR


def test_handler_validation_and_batching_kwargs(tiny_text_spec):
    h = TextEmbeddingHandler(tiny_text_spec, device="cpu", batch_size=16)
    # full batches: BatchElements growing from 1 padded short batches to a fixed shape (bench_cpu_pipeline)
    assert h.batch_elements_kwargs() == {"min_batch_size": 16, "max_batch_size": 16}
    assert h.get_metrics_namespace() == "catalog_index.encode.text"
    with pytest.raises(ValueError, match="auto, cpu"):
        TextEmbeddingHandler(tiny_text_spec, device="tpu")
    with pytest.raises(ValueError, match="precision"):
        TextEmbeddingHandler(tiny_text_spec, precision="int4")
    # the run config's rules (encoders.device.validate_placement), for a handler built without a config
    with pytest.raises(ValueError, match=r"batch_size must be in 1\.\.4096, or 0 for auto, got -1"):
        TextEmbeddingHandler(tiny_text_spec, batch_size=-1)
    with pytest.raises(ValueError, match=r"batch_size must be in 1\.\.4096"):
        TextEmbeddingHandler(tiny_text_spec, batch_size=5000)
    with pytest.raises(ValueError, match=r"model_copies_per_gpu must be in 0\.\.16"):
        TextEmbeddingHandler(tiny_text_spec, copies_per_gpu=17)
    with pytest.raises(ValueError, match="no image tower"):
        ImageEmbeddingHandler(tiny_text_spec)


def test_real_tiny_model_through_handler(tiny_clip_spec):
    h = ImageEmbeddingHandler(tiny_clip_spec, device="cpu", batch_size=4)
    model = h.load_model()
    pixels = [np.zeros((3, 32, 32), np.float32) + i for i in range(5)]
    results = list(h.run_inference(pixels, model))
    assert len(results) == 5
    assert all(r.inference.shape == (16,) for r in results)
