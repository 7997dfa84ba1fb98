"""Stage 3: encode one modality into one space with Beam's ``RunInference``.

Input ``((item_id, index), payload)``; outputs ``(item_id, ModalityVector)``
(main) and ``(item_id, ItemFailure)`` (``failed``) for items the model could
not encode on their own.
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from encoders.handlers import (ClapAudioHandler, EncodeFailure, ImageBytesHandler, ImageEmbeddingHandler,
                               TextEmbeddingHandler, TranscriptEmbeddingHandler)
from encoders.media import FetchPolicy
from encoders.preprocess import ImagePreprocess
from pipeline import progress
from pipeline.config import EncodeConfig, Route
from pipeline.records import ItemFailure, ModalityVector
from schemas.dead_letter import Stage

FAILED = "failed"


def handler_for(route: Route, config: EncodeConfig, preprocess: ImagePreprocess | None = None,
                fetch: FetchPolicy = FetchPolicy()):
    """The route's ModelHandler; with ``image_decode == "gpu"`` images arrive encoded and need ``preprocess``."""
    kwargs = dict(device=config.device, precision=config.precision, batch_size=config.batch_size,
                  copies_per_gpu=config.model_copies_per_gpu)
    if route.via == "transcript":
        return TranscriptEmbeddingHandler(route.spec, **kwargs)
    if route.via == "waveform":
        return ClapAudioHandler(route.spec, **kwargs)
    if route.modality == "image" and config.image_decode == "gpu":
        if preprocess is None:
            raise ValueError("image_decode 'gpu' needs the image tower's preprocessing")
        return ImageBytesHandler(route.spec, preprocess, fetch.max_image_pixels, **kwargs)
    cls = {"text": TextEmbeddingHandler, "image": ImageEmbeddingHandler}[route.modality]
    return cls(route.spec, **kwargs)


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
            stage = out.stage or Stage.ENCODE  # DECODE when the handler decoded the image (--image_decode gpu)
            yield beam.pvalue.TaggedOutput(FAILED, (item_id, ItemFailure(
                stage, out.reason, f"{self._route.modality}->{self._route.space}: {out.detail}", out.source)))
            return
        self._ok.inc()
        progress.note(f"encoded {self._route.modality}->{self._route.space}")
        yield item_id, ModalityVector(self._route.space, self._route.modality, index, out)


class EncodeRoute(beam.PTransform):
    """Keyed payloads of one modality -> vectors in one space (and failures)."""

    def __init__(self, route: Route, config: EncodeConfig, model_handler=None,
                 preprocess: ImagePreprocess | None = None, fetch: FetchPolicy = FetchPolicy()):
        super().__init__()
        self._route = route
        self._handler = model_handler or handler_for(route, config, preprocess, fetch)

    def expand(self, keyed):
        out = (
            keyed
            | "RunInference" >> RunInference(KeyedModelHandler(self._handler))
            | "Split" >> beam.ParDo(_Split(self._route)).with_outputs(FAILED, main="vectors")
        )
        return {"vectors": out.vectors, "failed": out[FAILED]}
