"""Stage 3a: speech recognition with Beam's ``RunInference`` over decoded clips.

Input ``((item_id, 0), AudioClip)``; outputs ``(item_id, Transcript)`` (main)
and ``(item_id, ItemFailure)`` (``failed``) for clips the recognizer could not
handle on their own. A clip without speech is not a failure: it yields an
empty transcript, and fusion decides whether the item has anything else.
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from encoders.asr import SAMPLE_RATE, AsrSpec
from encoders.handlers import AsrHandler, EncodeFailure
from pipeline import progress
from pipeline.config import EncodeConfig
from pipeline.records import ItemFailure
from schemas.dead_letter import Stage

FAILED = "failed"
NAMESPACE = "catalog_index.asr"


class _Split(beam.DoFn):
    def __init__(self):
        self._speech = Metrics.counter(NAMESPACE, "speech")
        self._no_speech = Metrics.counter(NAMESPACE, "no_speech")
        self._failed = Metrics.counter(NAMESPACE, "failed")

    def process(self, element):
        (item_id, _), result = element
        out = result.inference
        if isinstance(out, EncodeFailure):
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(
                FAILED, (item_id, ItemFailure(Stage.ENCODE, out.reason, f"speech recognition: {out.detail}",
                                              modality="audio")))
            return
        (self._speech if out.is_speech else self._no_speech).inc()
        progress.note("transcribed")
        yield item_id, out


class Transcribe(beam.PTransform):
    """Keyed clips -> keyed transcripts (and failures)."""

    def __init__(self, spec: AsrSpec, config: EncodeConfig, model_handler=None):
        super().__init__()
        self._handler = model_handler or AsrHandler(
            spec, device=config.device, precision=config.precision, batch_size=config.batch_size)

    def expand(self, clips):
        out = (
            clips
            | "At16kHz" >> beam.MapTuple(lambda key, clip: (key, clip.at(SAMPLE_RATE)))
            | "RunInference" >> RunInference(KeyedModelHandler(self._handler))
            | "Split" >> beam.ParDo(_Split()).with_outputs(FAILED, main="transcripts")
        )
        return {"transcripts": out.transcripts, "failed": out[FAILED]}


def spoken_texts(element):
    """(item_id, Transcript) -> ((item_id, 0), text) for clips that held speech."""
    item_id, transcript = element
    if transcript.is_speech:
        yield (item_id, 0), transcript.text
