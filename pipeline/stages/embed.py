"""The embed stage: per batch of items, fetch + decode, every encode route, transcription and fusion.

One element is a batch (a list of :class:`CatalogItem`); everything an item
needs happens inside the worker that holds its batch, so no modality vector is
shuffled and nothing joins an item's modalities back together. The logic is in
plain modules (``fetch``, ``fetch_audio``, ``encode``, ``transcribe``, ``fuse``);
this DoFn only sequences them and counts.

Outputs: ``records`` (one ``pa.Table`` in the embeddings schema per batch)
and ``dead`` (one :class:`DeadLetter` per item that failed). Every item of a
batch leaves in exactly one of the two.

Media of batch k are fetched and decoded on a thread pool while the main
thread encodes batch k-1 (torch releases the GIL), so decode overlaps the
model. Models are loaded in ``setup``: one copy per process (CLIP's text and
image handlers share it), or shared per GPU with ``--model_copies_per_gpu``.
"""
from __future__ import annotations

import collections
import concurrent.futures
import gc
import threading
import time
import typing

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from encoders.asr import SAMPLE_RATE
from encoders.attention import load_attention
from encoders.audio import AudioPolicy
from encoders.device import check_worker_gpu
from encoders.fusion import FusionConfig, Layout
from encoders.media import FetchPolicy, MediaError
from encoders.preprocess import ImagePreprocess
from pipeline.report import sample as report_sample
from pipeline.stages import faults, progress
from pipeline.config import Route
from pipeline.stages.encode import RouteEncoder
from pipeline.stages.fetch import NAMESPACE as FETCH_NAMESPACE, ImageFetcher, failure_stage, local_decode_threads
from pipeline.stages.fetch_audio import NAMESPACE as AUDIO_NAMESPACE, AudioFetcher, audio_failure_stage
from pipeline.stages.fuse import NAMESPACE as FUSE_NAMESPACE, ItemFuser
from pipeline.stages.records import ItemFailure, MediaDigest
from pipeline.stages.stage_metrics import StageTimer
from pipeline.stages.transcribe import Transcriber
from schemas.catalog import CatalogItem

DEAD, THUMBNAILS = "dead", "thumbnails"


def set_cpu_torch_threads(threads: int, device: str) -> bool:
    """Caps torch's intra-op threads in this process when its models run on the CPU; True if it did.

    On a shared CPU worker torch's pool (one thread per core) spin-waits after
    every small op, CPU burnt without work: measured on 2 cores with the tiny
    CLIP, a text-only item cost 10-25% more CPU with the default 2 threads
    than with 1 (docs/BENCHMARKS.md). ``threads`` 0 keeps torch's default; a
    GPU worker is left alone (its host threads only launch kernels).
    """
    import torch

    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if threads <= 0 or not on_cpu:
        return False
    torch.set_num_threads(threads)
    return True


_FROZEN = threading.Event()  # set once this process has frozen its heap


def freeze_heap_once() -> bool:
    """Collects, then moves every object alive now (modules, models, the runner) out of the cyclic GC's reach:
    once per process, at the first embed DoFn's setup; True if this call did it.

    A worker's heap holds ~0.5M long-lived objects (torch, Beam, the models), and each full
    (generation-2) collection scans all of them: ~0.25 CPU-s here, once or twice per 20k items, finding
    nothing among them (docs/BENCHMARKS.md, issue 11 rounds 5 and 7). Frozen objects are still freed by
    reference counting when they are dropped; only a reference cycle among them that becomes garbage later
    is never collected, a bounded one-time cost (objects made after the freeze are collected as usual).
    Never undone: unfreezing at teardown hands the whole heap back, and the next run's first full
    collection pays the scan again.
    """
    with _FREEZE_LOCK:
        if _FROZEN.is_set():
            return False
        gc.collect()
        gc.freeze()
        _FROZEN.set()
        return True


_FREEZE_LOCK = threading.Lock()


class _Embed(beam.DoFn):
    def __init__(self, routes: tuple[Route, ...], handlers: dict, asr_handler, preprocess: ImagePreprocess | None,
                 fetch: FetchPolicy, audio: AudioPolicy, audio_rates: tuple[int, ...], clap_rates: dict,
                 decode_images: bool,
                 layout: Layout, fusion: FusionConfig, model_fingerprint: str, media_errors: str,
                 schema: pa.Schema, device: str, threads: int, progress_interval_s: float, torch_threads: int = 0,
                 decode_processes: int = 0):
        self._routes, self._handlers, self._asr_handler = routes, handlers, asr_handler
        self._preprocess, self._fetch, self._audio, self._rates = preprocess, fetch, audio, audio_rates
        self._decode_images, self._clap_rates = decode_images, dict(clap_rates)
        self._layout, self._fusion, self._fp, self._media_errors = layout, fusion, model_fingerprint, media_errors
        self._schema, self._device, self._threads, self._interval = schema, device, threads, progress_interval_s
        self._torch_threads, self._decode_processes = torch_threads, decode_processes
        self._has_images = any(r.modality == "image" for r in routes)
        self._pending: collections.deque = collections.deque()
        self._pool = None

    def setup(self):
        check_worker_gpu(self._device)  # an old NVIDIA driver fails here, naming both versions
        set_cpu_torch_threads(self._torch_threads, self._device)
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="fetch")
        self._models = {}
        for handler in [*self._handlers.values(), *([self._asr_handler] if self._asr_handler else [])]:
            if id(handler) not in self._models:
                self._models[id(handler)] = handler.worker_model()
        self._encoders = [RouteEncoder(r, self._handlers[r]) for r in self._routes]
        self._transcriber = Transcriber(self._asr_handler) if self._asr_handler is not None else None
        self._fuser = ItemFuser(self._routes, self._layout, self._fusion, self._fp, self._media_errors,
                                attention=load_attention(self._fusion, self._routes, self._layout))
        # local media is CPU work: it decodes on the cores this thread leaves free (remote media: all threads)
        self._images = ImageFetcher(self._fetch, self._preprocess, self._decode_images,
                                    local_threads=local_decode_threads(self._threads),
                                    processes=self._decode_processes) if self._has_images else None
        self._clips = AudioFetcher(self._fetch, self._audio, self._rates) if self._rates else None
        self._timers = {s: StageTimer(s) for s in ("fetch_decode", "encode", "transcribe", "fuse")}
        self._counters = {
            "images": Metrics.counter(FETCH_NAMESPACE, "images"), "image_failed": Metrics.counter(FETCH_NAMESPACE, "failed"),
            "clips": Metrics.counter(AUDIO_NAMESPACE, "clips"), "audio_ms": Metrics.counter(AUDIO_NAMESPACE, "audio_ms"),
            "clip_failed": Metrics.counter(AUDIO_NAMESPACE, "failed"),
            "embedded": Metrics.counter(FUSE_NAMESPACE, "embedded"), "dead": Metrics.counter(FUSE_NAMESPACE, "dead_letters"),
        }
        self._thumbs = report_sample.LocalBound()  # items that may still be in the report's sample
        self._pending_thumbs = report_sample.PendingThumbnails(self._thumbs)  # JPEG-encoded at the bundle's end
        progress.start(self._interval)
        freeze_heap_once()  # last: the models are loaded, so they are frozen too

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def start_bundle(self):
        self._pending = collections.deque()
        self._pending_thumbs.clear()  # a failed bundle's candidates are retried with its batches

    def process(self, batch: list[CatalogItem]):
        batch = list(batch)
        # the report's thumbnail: the first photo of items that may be in its sample (smallest id hashes)
        sampled = frozenset(pos for pos, item in enumerate(batch) if item.image_uris and self._thumbs.offer(item.item_id))
        self._pending.append((batch, sampled, time.perf_counter(),
                              self._images.submit(self._pool, batch) if self._images else None,
                              self._clips.submit(self._pool, batch) if self._clips else None))
        # batch pipelines run in the global window, so the previous batch's outputs can leave here
        while len(self._pending) > 1:
            yield from self._embed(*self._pending.popleft())

    def finish_bundle(self):
        while self._pending:
            for out in self._embed(*self._pending.popleft()):
                if isinstance(out, beam.pvalue.TaggedOutput):
                    yield beam.pvalue.TaggedOutput(out.tag, GlobalWindows.windowed_value(out.value))
                else:
                    yield GlobalWindows.windowed_value(out)
        # only the candidates still among this worker's smallest keys can be in the report's sample
        for thumbnail in self._pending_thumbs.flush():
            yield beam.pvalue.TaggedOutput(THUMBNAILS, GlobalWindows.windowed_value(thumbnail))

    # ------------------------------------------------------------------ one batch

    def _media(self, batch, sampled, submitted_at, image_jobs, audio_jobs):
        n = len(batch)
        failures: list[list[ItemFailure]] = [[] for _ in range(n)]
        digests: list[list[MediaDigest]] = [[] for _ in range(n)]
        image_keys, image_payload, clip_positions, clips, thumbnails = [], None, [], [], []
        cpu = 0.0
        if image_jobs is not None:
            results, cpu_images = ImageFetcher.collect(image_jobs)
            cpu += cpu_images
            pixels = []
            for job, out in results:
                if isinstance(out, MediaError):
                    failures[job.item].append(ItemFailure(failure_stage(out), out.reason, out.detail, job.uri, "image"))
                    continue
                data, digest = out
                if job.index == 0 and job.item in sampled:
                    self._thumbnail(batch[job.item].item_id, data, thumbnails)
                digests[job.item].append(MediaDigest("image", job.index, digest))
                image_keys.append((job.item, job.index))
                pixels.append(data)
            self._counters["images"].inc(len(pixels))
            if len(results) > len(pixels):
                self._counters["image_failed"].inc(len(results) - len(pixels))
            if pixels and self._decode_images:
                image_payload = self._preprocess.normalize(np.stack(pixels))  # one pass over the batch
            else:
                image_payload = pixels
        if audio_jobs is not None:
            results, cpu_audio = AudioFetcher.collect(audio_jobs)
            cpu += cpu_audio
            for pos, uri, out in results:
                if isinstance(out, MediaError):
                    self._counters["clip_failed"].inc()
                    failures[pos].append(ItemFailure(audio_failure_stage(out), out.reason, out.detail, uri, "audio"))
                    continue
                clip, digest = out
                digests[pos].append(MediaDigest("audio", 0, digest))
                clip_positions.append(pos)
                clips.append(clip)
                self._counters["clips"].inc()
                self._counters["audio_ms"].inc(int(clip.duration_s * 1000))
        self._timers["fetch_decode"].record(time.perf_counter() - submitted_at, cpu, n)
        if image_keys:
            progress.note("images decoded", len(image_keys))
        return failures, digests, image_keys, image_payload, clip_positions, clips, thumbnails

    def _thumbnail(self, item_id: str, data, thumbnails: list) -> None:
        # from what was decoded for the tower (or, decoding on the GPU, the fetched bytes): nothing is fetched
        # again. Decoded pixels wait, shrunk, for the bundle's end (PendingThumbnails); bytes are made at once.
        if isinstance(data, np.ndarray):
            from PIL import Image

            self._pending_thumbs.add(item_id, Image.fromarray(data))
            return
        jpeg = report_sample.thumbnail_from_bytes(data.data, self._fetch.max_image_pixels)
        if jpeg:
            thumbnails.append(report_sample.Thumbnail(report_sample.sample_key(item_id), item_id, jpeg))

    def _embed(self, batch, sampled, submitted_at, image_jobs, audio_jobs):
        n = len(batch)
        failures, digests, image_keys, image_payload, clip_positions, clips, thumbnails = self._media(
            batch, sampled, submitted_at, image_jobs, audio_jobs)
        for thumbnail in thumbnails:
            if thumbnail is not None:
                yield beam.pvalue.TaggedOutput(THUMBNAILS, thumbnail)
        transcripts = {}
        if self._transcriber is not None and clips and SAMPLE_RATE in self._rates:
            with self._timers["transcribe"].batch(len(clips)):
                transcripts, asr_failures = self._transcriber.transcribe(
                    self._models[id(self._asr_handler)], clip_positions, clips)
            for pos, failure in asr_failures:
                failures[pos].append(failure)
            progress.note("transcribed", len(clips))
        vectors: list[list] = [[] for _ in range(n)]
        with self._timers["encode"].batch(n):
            for encoder in self._encoders:
                keys, payload = self._payload(encoder.route, batch, image_keys, image_payload, clip_positions,
                                              clips, transcripts)
                got, lost = encoder.encode(self._models[id(encoder.handler)], keys, payload)
                for pos, v in got:
                    vectors[pos].append(v)
                for pos, f in lost:
                    failures[pos].append(f)
        with self._timers["fuse"].batch(n):
            table, dead = self._fuser.fuse_table(batch, vectors, failures, digests, transcripts, self._schema)
        embedded = table.num_rows if table is not None else 0
        self._counters["embedded"].inc(embedded)
        if dead:
            self._counters["dead"].inc(len(dead))
        progress.note(progress.FUSED, embedded)
        progress.note(progress.FAILED, len(dead))
        for d in dead:
            yield beam.pvalue.TaggedOutput(DEAD, d)
        if table is not None:
            yield table
        faults.inject("fuse")  # test hook: fails a bundle after it has emitted records

    def _payload(self, route: Route, batch, image_keys, image_payload, clip_positions, clips, transcripts):
        if route.modality == "text":
            keys = [(pos, 0) for pos, item in enumerate(batch) if item.text]
            return keys, [batch[pos].text for pos, _ in keys]
        if route.modality == "image":
            return image_keys, image_payload
        if route.via == "transcript":
            keys = [(pos, 0) for pos in clip_positions if pos in transcripts and transcripts[pos].is_speech]
            return keys, [transcripts[pos].text for pos, _ in keys]
        rate = self._clap_rates[route]  # CLAP's own rate, usually 48 kHz
        return [(pos, 0) for pos in clip_positions], [clip.at(rate) for clip in clips]


class EmbedOutputs(typing.NamedTuple):
    """What the embed stage hands on (each a PCollection)."""

    records: beam.PCollection  # pa.Table of fused rows (embeddings schema), one per batch
    dead: beam.PCollection  # DeadLetter: items that failed fetch, decode, transcription or encode
    thumbnails: beam.PCollection  # the report's thumbnails of sample candidates (pipeline/report/sample.py)


class EmbedBatches(beam.PTransform):
    """Batches of CatalogItem -> :class:`EmbedOutputs`."""

    def __init__(self, **kwargs):
        super().__init__()
        load_attention(kwargs["fusion"], kwargs["routes"], kwargs["layout"])  # fail at launch on a bad module
        self._fn = _Embed(**kwargs)

    def expand(self, batches) -> EmbedOutputs:
        out = batches | "Embed" >> beam.ParDo(self._fn).with_outputs(DEAD, THUMBNAILS, main="records")
        return EmbedOutputs(records=out.records, dead=out[DEAD], thumbnails=out[THUMBNAILS])
