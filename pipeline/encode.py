"""Stage 3: encode one modality into one space with Beam's ``RunInference``.

Input ``((item_id, index), payload)``; outputs ``(item_id, ModalityVector)``
(main) and ``(item_id, ItemFailure)`` (``failed``) for items the model could
not encode on their own.
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from encoders.handlers import (ClapAudioHandler, EncodeFailure, ImageEmbeddingHandler, TextEmbeddingHandler,
                               TranscriptEmbeddingHandler)
from pipeline import progress
from pipeline.config import EncodeConfig, Route
from pipeline.records import ItemFailure, ModalityVector
from schemas.dead_letter import Stage

FAILED = "failed"


def handler_for(route: Route, config: EncodeConfig):
    if route.via == "transcript":
        cls = TranscriptEmbeddingHandler
    elif route.via == "waveform":
        cls = ClapAudioHandler
    else:
        cls = {"text": TextEmbeddingHandler, "image": ImageEmbeddingHandler}[route.modality]
    return cls(route.spec, device=config.device, precision=config.precision, batch_size=config.batch_size)


class _Split(beam.DoFn):
    def __init__(self, route: Route):
        self._route = route
        self._ok = Metrics.counter(f"catalog_index.encode.{route.modality}_{route.space}", "encoded")
        self._failed = Metrics.counter(f"catalog_index.encode.{route.modality}_{route.space}", "failed")

    def process(self, element):
        (item_id, index), result = element
        out = result.inference
        if isinstance(out, EncodeFailure):
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(
                FAILED, (item_id, ItemFailure(Stage.ENCODE, out.reason, f"{self._route.modality}->{self._route.space}: {out.detail}")))
            return
        self._ok.inc()
        progress.note(f"encoded {self._route.modality}->{self._route.space}")
        yield item_id, ModalityVector(self._route.space, self._route.modality, index, out)


class EncodeRoute(beam.PTransform):
    """Keyed payloads of one modality -> vectors in one space (and failures)."""

    def __init__(self, route: Route, config: EncodeConfig, model_handler=None):
        super().__init__()
        self._route = route
        self._handler = model_handler or handler_for(route, config)

    def expand(self, keyed):
        out = (
            keyed
            | "RunInference" >> RunInference(KeyedModelHandler(self._handler))
            | "Split" >> beam.ParDo(_Split(self._route)).with_outputs(FAILED, main="vectors")
        )
        return {"vectors": out.vectors, "failed": out[FAILED]}
