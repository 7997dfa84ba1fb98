"""Stage 2b: fetch and decode each item's audio clip on CPU threads.

Outputs ``((item_id, 0), AudioClip)`` with mono waveforms at every rate the
run's audio models want (main), ``(item_id, MediaDigest)`` (``digests``) and
``(item_id, ItemFailure)`` (``failed``). Threads overlap I/O; libsndfile and
soxr release the GIL while they decode and resample.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import time

import apache_beam as beam
from apache_beam.metrics import Metrics

from encoders.audio import AudioClip, AudioPolicy, decode_audio
from encoders.media import FetchPolicy, MediaError, fetch_bytes, resolve_uri
from pipeline import progress
from pipeline.records import ItemFailure, MediaDigest
from pipeline.stage_metrics import StageTimer
from schemas.catalog import CatalogItem
from schemas.dead_letter import Reason, Stage

DIGESTS, FAILED = "digests", "failed"
NAMESPACE = "catalog_index.fetch_audio"
_DECODE_REASONS = (Reason.DECODE_FAILED, Reason.UNSUPPORTED_FORMAT, Reason.AUDIO_TOO_LONG, Reason.SILENT_AUDIO)


def load_audio(uri: str, fetch: FetchPolicy, audio: AudioPolicy, rates: tuple[int, ...]) -> tuple[AudioClip, str]:
    """One audio URI -> (decoded clip, sha256 of its bytes); raises MediaError."""
    data = fetch_bytes(uri, fetch)
    return decode_audio(data, rates, audio), hashlib.sha256(data).hexdigest()


class _FetchAudio(beam.DoFn):
    def __init__(self, fetch: FetchPolicy, audio: AudioPolicy, rates: tuple[int, ...], threads: int,
                 progress_interval_s: float):
        self._fetch, self._audio, self._rates = fetch, audio, rates
        self._threads, self._interval = threads, progress_interval_s
        self._ok = Metrics.counter(NAMESPACE, "clips")
        self._seconds = Metrics.counter(NAMESPACE, "audio_ms")
        self._failed = Metrics.counter(NAMESPACE, "failed")
        self._timer = StageTimer("fetch_audio")
        self._pool = None

    def setup(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="fetch-audio")
        progress.start(self._interval)

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _one(self, uri: str):
        try:
            return load_audio(uri, self._fetch, self._audio, self._rates)
        except MediaError as e:
            return e
        except Exception as e:  # noqa: BLE001 - a bug in one decode must not fail the batch
            return MediaError(Reason.DECODE_FAILED, f"{type(e).__name__}: {e}")

    def _timed(self, uri: str):
        wall, cpu = time.perf_counter(), time.thread_time()
        result = self._one(uri)
        return result, time.perf_counter() - wall, time.thread_time() - cpu

    def process(self, items: list[CatalogItem]):
        jobs = [(item, resolve_uri(item.audio_uri, item.base_uri)) for item in items]
        timed = list(self._pool.map(lambda job: self._timed(job[1]), jobs))
        # pool threads' time summed per batch, recorded here: Beam's metric containers are per thread
        self._timer.record(sum(t[1] for t in timed), sum(t[2] for t in timed), len(items))
        for (item, uri), (result, _, _) in zip(jobs, timed):
            if isinstance(result, MediaError):
                self._failed.inc()
                stage = Stage.DECODE if result.reason in _DECODE_REASONS else Stage.FETCH
                yield beam.pvalue.TaggedOutput(
                    FAILED, (item.item_id, ItemFailure(stage, result.reason, result.detail, uri, "audio")))
                continue
            clip, digest = result
            self._ok.inc()
            self._seconds.inc(int(clip.duration_s * 1000))
            progress.note("audio decoded")
            yield beam.pvalue.TaggedOutput(DIGESTS, (item.item_id, MediaDigest("audio", 0, digest)))
            yield (item.item_id, 0), clip


class FetchAudio(beam.PTransform):
    """CatalogItem -> {clips, digests, failed}; items without audio pass through untouched."""

    def __init__(self, fetch: FetchPolicy, audio: AudioPolicy, rates: tuple[int, ...], threads: int = 4,
                 progress_interval_s: float = 0.0):
        super().__init__()
        if not rates:
            raise ValueError("FetchAudio needs at least one target sample rate")
        self._fn = _FetchAudio(fetch, audio, tuple(sorted(set(rates))), threads, progress_interval_s)

    def expand(self, items):
        out = (
            items
            | "WithAudio" >> beam.Filter(lambda item: bool(item.audio_uri))
            | "BatchForThreads" >> beam.BatchElements(min_batch_size=1, max_batch_size=16)
            | "FetchDecode" >> beam.ParDo(self._fn).with_outputs(DIGESTS, FAILED, main="clips")
        )
        return {"clips": out.clips, "digests": out[DIGESTS], "failed": out[FAILED]}
