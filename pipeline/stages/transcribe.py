"""Speech recognition over a batch's clips (plain logic around ``AsrHandler``).

A clip without speech is not a failure: it yields an empty transcript, and
fusion decides whether the item has anything else. A clip the recognizer
cannot handle on its own becomes an :class:`ItemFailure` for that item only.
"""
from __future__ import annotations

from typing import Sequence

from apache_beam.metrics import Metrics

from encoders.asr import SAMPLE_RATE, Transcript
from encoders.audio import AudioClip
from encoders.handlers import EncodeFailure
from pipeline.stages.records import ItemFailure
from schemas.dead_letter import Stage

NAMESPACE = "catalog_index.asr"


class Transcriber:
    def __init__(self, handler):
        self.handler = handler
        self._speech = Metrics.counter(NAMESPACE, "speech")
        self._no_speech = Metrics.counter(NAMESPACE, "no_speech")
        self._failed = Metrics.counter(NAMESPACE, "failed")

    def transcribe(self, model, positions: Sequence[int], clips: Sequence[AudioClip]
                   ) -> tuple[dict[int, Transcript], list[tuple[int, ItemFailure]]]:
        """Clips (at any rates, 16 kHz among them) -> {position: Transcript}, [(position, ItemFailure)]."""
        if not positions:
            return {}, []
        transcripts, failures = {}, []
        outputs = self.handler.apply(model, [clip.at(SAMPLE_RATE) for clip in clips])
        for pos, out in zip(positions, outputs):
            if isinstance(out, EncodeFailure):
                self._failed.inc()
                failures.append((pos, ItemFailure(Stage.ENCODE, out.reason, f"speech recognition: {out.detail}",
                                                  modality="audio")))
                continue
            (self._speech if out.is_speech else self._no_speech).inc()
            transcripts[pos] = out
        return transcripts, failures
