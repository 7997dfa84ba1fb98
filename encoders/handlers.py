"""Beam ``ModelHandler``s, one per modality; ``RunInference`` does batching and sharing.

A handler never fails a batch for one bad item: when a batch raises, it is
retried item by item and only the items that fail on their own come back as
:class:`EncodeFailure`, which the pipeline turns into dead-letter rows.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Iterable, Sequence

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from encoders import towers
from encoders.device import resolve_device, validate_device_spec
from encoders.specs import ModelSpec
from schemas.dead_letter import Reason

PRECISIONS = ("fp32", "bf16", "fp16")
ENCODE_US = "encode_wall_us"  # Distribution metric name (microseconds), namespace catalog_index.encode.<modality>
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EncodeFailure:
    """Stands in a handler's output for an item that could not be encoded."""

    reason: Reason
    detail: str


class _EmbeddingHandler(ModelHandler[Any, Any, Any]):
    modality = ""

    def __init__(self, spec: ModelSpec, *, device: str = "auto", precision: str = "fp32", batch_size: int = 32):
        validate_device_spec(device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.spec, self.device, self.precision, self.batch_size = spec, device, precision, batch_size
        super().__init__()

    def load_model(self):
        return towers.load(self.spec, resolve_device(self.device), self.precision)

    def _encode(self, model, batch: list) -> np.ndarray:
        raise NotImplementedError

    def run_inference(self, batch: Sequence[Any], model, inference_args=None) -> Iterable[PredictionResult]:
        batch = list(batch)
        # Encoder wall time per batch (µs), retries included: what incremental runs save,
        # readable from the PipelineResult (pipeline.metrics.encoder_seconds).
        started = time.perf_counter()
        try:
            outputs: list = list(self._encode(model, batch))
        except Exception as batch_error:  # noqa: BLE001 - isolate the culprit below
            _LOG.warning("%s batch of %d failed (%s); retrying item by item", self.modality, len(batch), batch_error)
            outputs = []
            for example in batch:
                try:
                    outputs.append(self._encode(model, [example])[0])
                except Exception as e:  # noqa: BLE001
                    outputs.append(EncodeFailure(Reason.ENCODE_FAILED, f"{type(e).__name__}: {e}"))
        Metrics.distribution(self.get_metrics_namespace(), ENCODE_US).update(
            int(round((time.perf_counter() - started) * 1e6)))
        results = []
        for example, out in zip(batch, outputs):
            if isinstance(out, np.ndarray) and not np.all(np.isfinite(out)):
                out = EncodeFailure(Reason.NONFINITE_VECTOR, f"{self.spec.name} produced NaN/inf")
            results.append(PredictionResult(example, out, self.spec.name))
        return results

    def batch_elements_kwargs(self) -> dict:
        # Full batches, not BatchElements' adaptive 1, 2, 4...: every forward pass is padded to a
        # fixed row count anyway, so small first batches cost as much as full ones (a 1%-changed
        # nightly run otherwise spends most of its encoder time on padding).
        return {"min_batch_size": self.batch_size, "max_batch_size": self.batch_size}

    def get_metrics_namespace(self) -> str:
        return f"catalog_index.encode.{self.modality}"

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return sum(x.nbytes if isinstance(x, np.ndarray) else len(str(x).encode()) for x in batch)


class TextEmbeddingHandler(_EmbeddingHandler):
    """Text -> unit vector through a CLIP text tower or a sentence encoder."""

    modality = "text"

    def _encode(self, model, batch: list) -> np.ndarray:
        return model.encode_text([str(t) for t in batch], self.batch_size)


class ImageEmbeddingHandler(_EmbeddingHandler):
    """Preprocessed pixels [3, S, S] -> unit vector through a CLIP image tower."""

    modality = "image"

    def __init__(self, spec: ModelSpec, **kwargs):
        if spec.family not in ("open_clip", "hf_clip"):
            raise ValueError(f"{spec.family} has no image tower; use an open_clip or hf_clip model")
        super().__init__(spec, **kwargs)

    def _encode(self, model, batch: list) -> np.ndarray:
        return model.encode_image(np.stack(batch), self.batch_size)
