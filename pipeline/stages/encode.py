"""Encode routes over a batch: one model family per route, applied to the batch's payloads.

Plain logic around the handlers (``encoders/handlers.py``): ``handler_for``
picks the route's handler; :class:`RouteEncoder` applies it to the payloads
of one batch (texts, a stacked pixel array, clips) and turns each output into
a :class:`ModalityVector` or an :class:`ItemFailure`. The handler runs the
model in fixed-shape sub-batches and isolates an item that fails on its own.
A new model family plugs in as a handler; nothing here changes.
"""
from __future__ import annotations

from typing import Sequence

from apache_beam.metrics import Metrics

from encoders.handlers import (ClapAudioHandler, EncodeFailure, ImageBytesHandler, ImageEmbeddingHandler,
                               TextEmbeddingHandler, TranscriptEmbeddingHandler)
from encoders.media import FetchPolicy
from encoders.preprocess import ImagePreprocess
from pipeline.config import EncodeConfig, Route
from pipeline.stages.records import ItemFailure, ModalityVector
from schemas.dead_letter import Stage


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


def route_label(route: Route) -> str:
    return f"{route.modality}->{route.space}" + (f" via {route.via}" if route.via else "")


class RouteEncoder:
    """One route's handler and the counters ``catalog_index.encode.<modality>_<space>`` (encoded, failed)."""

    def __init__(self, route: Route, handler):
        self.route, self.handler = route, handler
        namespace = f"catalog_index.encode.{route.modality}_{route.space}"
        self._ok = Metrics.counter(namespace, "encoded")
        self._failed = Metrics.counter(namespace, "failed")

    def encode(self, model, keys: Sequence[tuple[int, int]], payload) -> tuple[list, list]:
        """``keys[i] = (item position, index)`` of ``payload[i]`` -> ([(pos, ModalityVector)], [(pos, ItemFailure)])."""
        if not len(keys):
            return [], []
        route = self.route
        vectors, failures = [], []
        for (pos, index), out in zip(keys, self.handler.apply(model, payload)):
            if isinstance(out, EncodeFailure):
                stage = out.stage or Stage.ENCODE  # DECODE when the handler decoded the image (--image_decode gpu)
                modality = route.modality if stage is Stage.DECODE else ""
                failures.append((pos, ItemFailure(stage, out.reason, f"{route.modality}->{route.space}: {out.detail}",
                                                  out.source, modality)))
            else:
                vectors.append((pos, ModalityVector(route.space, route.modality, index, out)))
        self._ok.inc(len(vectors))
        if failures:
            self._failed.inc(len(failures))
        return vectors, failures
