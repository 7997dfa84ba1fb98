"""Reuse of a trained IVF-PQ quantizer, decided by measured quantization error on seeded data."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from pipeline.index.quantizer_reuse import quantization_error, sample_rows, should_reuse_quantizer

DIM, CLUSTERS = 32, 24


def _clustered(n: int, centers: np.ndarray, seed: int, noise: float = 0.15) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = centers[rng.integers(0, len(centers), n)] + noise * rng.standard_normal((n, centers.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _centers(seed: int) -> np.ndarray:
    c = np.random.default_rng(seed).standard_normal((CLUSTERS, DIM))
    return c / np.linalg.norm(c, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def trained():
    """An IVF-PQ trained on distribution A, serialized and loaded back as a later run would."""
    centers = _centers(1)
    train = _clustered(3000, centers, seed=10)
    index = faiss.index_factory(DIM, "IVF16,PQ8x6")
    index.train(train)
    loaded = faiss.deserialize_index(faiss.serialize_index(index))
    held_out = _clustered(1000, centers, seed=9)  # the error recorded at training time
    return loaded, quantization_error(loaded, held_out), centers


def test_training_vectors_read_optimistic(trained):
    index, held_out_error, centers = trained
    train = _clustered(3000, centers, seed=10)
    assert quantization_error(index, train) < held_out_error


def test_same_distribution_reuses(trained):
    index, train_error, centers = trained
    sample = sample_rows(_clustered(5000, centers, seed=11), 1000, seed=0)
    decision = should_reuse_quantizer(index, sample, train_error, previous_model_fingerprint="m",
                                      model_fingerprint="m")
    assert decision.reuse, decision.reason
    assert decision.sample_size == 1000 and decision.error_ratio < 1.1
    assert decision.to_json()["reuse"] is True


def test_drifted_distribution_retrains(trained):
    index, train_error, _ = trained
    drifted = _clustered(1000, _centers(2), seed=12)
    decision = should_reuse_quantizer(index, drifted, train_error, previous_model_fingerprint="m",
                                      model_fingerprint="m")
    assert not decision.reuse and "drifted" in decision.reason
    assert decision.error_ratio > 1.1


def test_partial_drift_is_measured_against_the_tolerance(trained):
    index, train_error, centers = trained
    mixed = np.concatenate([_clustered(700, centers, seed=13), _clustered(300, _centers(3), seed=14)])
    ratio = should_reuse_quantizer(index, mixed, train_error, previous_model_fingerprint="m",
                                   model_fingerprint="m").error_ratio
    assert ratio > 1.1
    assert should_reuse_quantizer(index, mixed, train_error, previous_model_fingerprint="m", model_fingerprint="m",
                                  tolerance=ratio).reuse


@pytest.mark.parametrize("case", ["model", "dim", "small", "missing"])
def test_refusals_name_their_reason(trained, case):
    index, train_error, centers = trained
    sample = _clustered(1000, centers, seed=15)
    kwargs = dict(previous_model_fingerprint="m", model_fingerprint="m")
    if case == "model":
        kwargs["model_fingerprint"] = "other"
    elif case == "dim":
        sample = np.zeros((1000, DIM + 1), np.float32)
    elif case == "small":
        sample = sample[:10]
    elif case == "missing":
        index = None
    decision = should_reuse_quantizer(index, sample, train_error, **kwargs)
    assert not decision.reuse
    assert {"model": "model", "dim": "dimension", "small": "below", "missing": "no previous"}[case] in decision.reason


def test_quantization_error_rejects_wrong_shapes(trained):
    index, _, _ = trained
    with pytest.raises(ValueError, match="dimension"):
        quantization_error(index, np.zeros((3, DIM - 1), np.float32))
    with pytest.raises(ValueError, match="not trained"):
        quantization_error(faiss.index_factory(DIM, "IVF16,PQ8x6"), np.zeros((3, DIM), np.float32))
