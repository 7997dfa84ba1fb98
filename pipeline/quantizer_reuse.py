"""Whether a new run may reuse the previous run's trained IVF-PQ quantizer instead of training again.

The indexes are rebuilt for every run (the vectors change), but training the
coarse quantizer and the PQ codebooks is the costly part and only needs
redoing when the vector distribution moved. The criterion is measured, not
assumed: the quantization error (mean squared reconstruction error of the
trained codec) on a sample of the new run's vectors, against the error the
quantizer had, when trained, on a held-out sample of its own run. Reuse needs the same model
fingerprint (same vector space), the same dimension, and an error ratio
within ``1 + tolerance``. The decision and its figures go to the manifest.

Plain functions over numpy arrays and faiss indexes; the index stage calls them.
"""
from __future__ import annotations

import dataclasses

import faiss
import numpy as np

DEFAULT_TOLERANCE = 0.10  # up to 10% more distortion than at training time is accepted
DEFAULT_MIN_SAMPLE = 256


@dataclasses.dataclass(frozen=True)
class QuantizerDecision:
    """Reuse or retrain, why, and the figures measured to decide."""

    reuse: bool
    reason: str
    sample_size: int = 0
    previous_error: float | None = None
    sample_error: float | None = None
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def error_ratio(self) -> float | None:
        if self.previous_error is None or self.sample_error is None or self.previous_error <= 0:
            return None
        return self.sample_error / self.previous_error

    def to_json(self) -> dict:
        return {"reuse": self.reuse, "reason": self.reason, "sample_size": self.sample_size,
                "previous_error": self.previous_error, "sample_error": self.sample_error,
                "error_ratio": self.error_ratio, "tolerance": self.tolerance}


def quantization_error(index: faiss.Index, vectors: np.ndarray) -> float:
    """Mean squared reconstruction error of ``vectors`` through the trained index's codec.

    Uses the standalone codec (``sa_encode``/``sa_decode``): for IVF-PQ that is
    the coarse centroid plus the PQ-coded residual, exactly what a search sees.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != index.d:
        raise ValueError(f"vectors of shape {x.shape} do not fit an index of dimension {index.d}")
    if not index.is_trained:
        raise ValueError("the index is not trained")
    decoded = index.sa_decode(index.sa_encode(x))
    return float(np.mean(np.sum((x - decoded) ** 2, axis=1)))


def sample_rows(vectors: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """At most ``n`` rows drawn without replacement, seeded (reruns decide the same way)."""
    if len(vectors) <= n:
        return vectors
    rows = np.random.default_rng(seed).choice(len(vectors), size=n, replace=False)
    return vectors[np.sort(rows)]


def should_reuse_quantizer(
    previous_index: faiss.Index | None,
    sample: np.ndarray,
    previous_error: float | None,
    *,
    previous_model_fingerprint: str,
    model_fingerprint: str,
    tolerance: float = DEFAULT_TOLERANCE,
    min_sample: int = DEFAULT_MIN_SAMPLE,
) -> QuantizerDecision:
    """Decides whether ``previous_index`` (empty, trained) can quantize this run's vectors.

    ``previous_error`` is :func:`quantization_error` of the previous index on a
    held-out sample of its run's vectors (not the training vectors themselves:
    the codebooks are fitted to those, so their error reads optimistic and any
    new sample would look drifted), recorded when it was trained; ``sample`` is
    drawn from this run's vectors (:func:`sample_rows`).
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    n = int(len(sample))
    if previous_index is None or previous_error is None:
        return QuantizerDecision(False, "no previous trained index or no recorded training error", n,
                                 tolerance=tolerance)
    if previous_model_fingerprint != model_fingerprint:
        return QuantizerDecision(False, "model or fusion settings changed", n, previous_error, tolerance=tolerance)
    if sample.ndim != 2 or sample.shape[1] != previous_index.d:
        return QuantizerDecision(False, f"dimension changed ({previous_index.d} -> {sample.shape[-1]})", n,
                                 previous_error, tolerance=tolerance)
    if not previous_index.is_trained:
        return QuantizerDecision(False, "previous index is not trained", n, previous_error, tolerance=tolerance)
    if n < min_sample:
        return QuantizerDecision(False, f"sample of {n} vectors is below the {min_sample} needed to measure drift",
                                 n, previous_error, tolerance=tolerance)
    error = quantization_error(previous_index, sample)
    limit = previous_error * (1 + tolerance)
    if error <= limit:
        return QuantizerDecision(True, f"quantization error {error:.4g} <= {limit:.4g} (training {previous_error:.4g} "
                                       f"x {1 + tolerance:g})", n, previous_error, error, tolerance)
    return QuantizerDecision(False, f"data drifted: quantization error {error:.4g} > {limit:.4g} (training "
                                    f"{previous_error:.4g} x {1 + tolerance:g})", n, previous_error, error, tolerance)
