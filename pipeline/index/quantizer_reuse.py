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

from pipeline.index.defaults import REUSE_SETTINGS
from schemas.manifest import Manifest, Quantizer

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


# --------------------------------------------------------------------------- what the index stage records and reads

# the index families whose trained quantizer a later run may reuse (the IVF ones; see pipeline/index/index_select.py)
REUSABLE_FAMILIES = ("ivf_sq8", "ivf_fp16", "ivf_pq", "ivf_pq_opq", "ivf_pq_refine")
NOT_APPLICABLE = "exact flat index: no quantizer to train or reuse"


@dataclasses.dataclass(frozen=True)
class PreviousQuantizer:
    """What a published run's manifest says about its trained index (read when the graph is built)."""

    run_id: str
    trained_path: str  # absolute path of its index/trained.faiss
    sha256: str | None  # as listed in its manifest's files, to refuse a file changed since
    factory: str
    metric: str
    kind: str
    model_fingerprint: str
    baseline_error: float | None  # held-out quantization error when the quantizer was trained
    trained_run_id: str  # the run that trained it (older than run_id when run_id itself reused it)
    family: str = ""  # pipeline.index.index_select family ("" for a user factory string or an older run)
    search_params: dict = dataclasses.field(default_factory=dict)  # the run's recommended search setting
    bytes_per_vector: float = 0.0  # its memory per vector (0: not recorded)

    @staticmethod
    def from_manifest(run_dir: str, manifest: Manifest) -> "PreviousQuantizer | None":
        """None when the run built no index (``--index off``)."""
        index = manifest.index
        if index is None or not index.trained:
            return None
        recorded = index.quantizer or Quantizer()
        entry = manifest.file(index.trained)
        run_id = manifest.run_id
        return PreviousQuantizer(
            run_id=run_id, trained_path=f"{run_dir.rstrip('/')}/{index.trained}",
            sha256=entry.sha256 if entry is not None else None,
            factory=index.factory, metric=index.metric, kind=index.kind,
            model_fingerprint=recorded.model_fingerprint or manifest.model_fingerprint,
            baseline_error=recorded.baseline_error, trained_run_id=recorded.trained_run_id or run_id,
            family=index.family, search_params=dict(index.search_params or {}),
            bytes_per_vector=float(index.bytes_per_vector or 0.0))


def decide(previous: PreviousQuantizer | None, load_previous, held_out: np.ndarray, *, factory: str, metric: str,
           model_fingerprint: str, setting: str = "auto", tolerance: float = DEFAULT_TOLERANCE,
           unavailable: str = "", min_sample: int = DEFAULT_MIN_SAMPLE) -> tuple[QuantizerDecision, faiss.Index | None]:
    """(decision, the previous trained index when it is to be reused, else None) for an IVF run.

    Cheap refusals come first; ``load_previous()`` (-> faiss.Index, raises
    ValueError or OSError with a readable message) is only called when the
    measurement is needed. ``held_out`` are this run's held-out sample rows:
    the same selection rule (smallest item-id hashes, never trained on) as the
    rows the baseline was measured on, so an unchanged catalog measures the
    same error and a changed one measures its drift.
    """
    if setting not in REUSE_SETTINGS:
        raise ValueError(f"reuse setting {setting!r} is not one of {REUSE_SETTINGS}")
    n = int(len(held_out))

    def refuse(reason: str) -> tuple[QuantizerDecision, None]:
        error = previous.baseline_error if previous is not None else None
        return QuantizerDecision(False, reason, n, error, tolerance=tolerance), None

    if setting == "never":
        return refuse("reuse disabled (--reuse_quantizer never)")
    if previous is None:
        return refuse(unavailable or "no previous run with a trained index")
    if previous.kind != "ivfpq":
        return refuse(f"previous run {previous.run_id} built an exact flat index: no quantizer to reuse"
                      if previous.kind == "flat" else
                      f"previous run {previous.run_id} built a {previous.kind} index: no quantizer to reuse")
    if previous.family and previous.family not in REUSABLE_FAMILIES:
        return refuse(f"previous run {previous.run_id} built a {previous.family} index: quantizer reuse applies "
                      f"to {', '.join(REUSABLE_FAMILIES)}")
    if (previous.factory, previous.metric) != (factory, metric):
        return refuse(f"index parameters changed ({previous.factory} {previous.metric} -> {factory} {metric})")
    if previous.baseline_error is None:
        return refuse(f"previous run {previous.run_id} recorded no held-out quantization error")
    try:
        index = load_previous()
    except (OSError, ValueError, RuntimeError) as e:  # a missing/changed file must not fail the run: retrain
        return refuse(f"previous trained index unusable: {e}")
    decision = should_reuse_quantizer(index, held_out, previous.baseline_error,
                                      previous_model_fingerprint=previous.model_fingerprint,
                                      model_fingerprint=model_fingerprint, tolerance=tolerance, min_sample=min_sample)
    return decision, (index if decision.reuse else None)


def held_out_error(index: faiss.Index, held_out: np.ndarray) -> float | None:
    """The error the next run compares with; None without held-out rows or for a codec faiss cannot sa_encode."""
    if not len(held_out):
        return None
    try:
        return quantization_error(index, held_out)
    except RuntimeError:  # some user factory strings have no standalone codec
        return None


def manifest_block(decision: QuantizerDecision | None, *, setting: str, model_fingerprint: str,
                   previous: PreviousQuantizer | None = None, fresh_error: float | None = None,
                   held_out_vectors: int = 0, run_id: str = "", not_applicable: str = NOT_APPLICABLE) -> dict:
    """``Manifest.index.quantizer`` (as JSON): the decision and its figures, and what the next run compares with.

    ``baseline_error`` is the held-out error at *training* time; a reusing run
    carries it forward unchanged, so slow drift over many nights adds up
    against it instead of each night being compared with the one before
    (which would let a 5% drift per night pass for ever). ``held_out_error``
    is tonight's measurement through the quantizer actually used.
    """
    if decision is None:
        return {"applicable": False, "reused": False, "reason": not_applicable, "reuse_setting": setting,
                "model_fingerprint": model_fingerprint, "applies_to": list(REUSABLE_FAMILIES)}
    reused = decision.reuse
    if reused:
        if previous is None:
            raise ValueError("a decision to reuse a quantizer needs the previous run's quantizer")
        reused_from, trained_run, baseline = previous.run_id, previous.trained_run_id, previous.baseline_error
    else:
        reused_from, trained_run, baseline = None, run_id, fresh_error
    return {
        "applicable": True,
        "applies_to": list(REUSABLE_FAMILIES),
        "reused": reused,
        **decision.to_json(),
        "reuse_setting": setting,
        "model_fingerprint": model_fingerprint,
        "reused_from_run_id": reused_from,
        "trained_run_id": trained_run,
        "baseline_error": baseline,
        "held_out_error": fresh_error,
        "held_out_vectors": held_out_vectors,
    }
