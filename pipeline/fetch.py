"""Stage 2: fetch, decode and preprocess images on CPU threads.

Outputs ``((item_id, index), pixels)`` ready for the image tower (main),
``(item_id, MediaDigest)`` for the content hash (``digests``) and
``(item_id, ItemFailure)`` for anything that went wrong (``failed``).
Items are fetched in batches on a thread pool: reads wait on I/O and PIL
releases the GIL while decoding, so threads overlap both.

The pool runs one batch ahead: ``process`` submits batch k and emits batch
k-1, so while the main thread carries k-1 through the (fused) encode step,
which releases the GIL in torch, the threads decode batch k. With
``decode=False`` (``--image_decode gpu``) the stage reads bytes, checks the
header, and emits :class:`ImageBytes` for the image handler to decode on the GPU.
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import time
from typing import Callable

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from apache_beam.transforms.window import GlobalWindows

from encoders.handlers import ImageBytes
from encoders.media import FetchPolicy, MediaError, decode_image, fetch_bytes, probe_image, resolve_uri
from encoders.preprocess import ImagePreprocess
from pipeline import progress, report_sample
from pipeline.records import ItemFailure, MediaDigest
from pipeline.stage_metrics import StageTimer
from schemas.catalog import CatalogItem
from schemas.dead_letter import Reason, Stage

DIGESTS, FAILED, THUMBNAILS = "digests", "failed", "thumbnails"
NAMESPACE = "catalog_index.fetch"


def load_image(uri: str, policy: FetchPolicy, preprocess: ImagePreprocess,
               on_decoded: Callable | None = None) -> tuple[np.ndarray, str]:
    """One image URI -> (preprocessed pixels, sha256 of its bytes); raises MediaError.

    ``on_decoded(image)`` sees the decoded image before preprocessing (the report's thumbnail).
    """
    data = fetch_bytes(uri, policy)
    digest = hashlib.sha256(data).hexdigest()
    try:
        image = decode_image(data, policy.max_image_pixels)
    except MediaError as e:
        e.stage = Stage.DECODE  # the bytes arrived; decoding (or its pixel cap) failed
        raise
    if on_decoded is not None:
        on_decoded(image)
    return preprocess(image), digest


def load_image_bytes(uri: str, policy: FetchPolicy) -> tuple[ImageBytes, str]:
    """One image URI -> (its bytes, header checked but not decoded; sha256); raises MediaError."""
    data = fetch_bytes(uri, policy)
    probe_image(data, policy.max_image_pixels)
    return ImageBytes(uri, data), hashlib.sha256(data).hexdigest()


class _FetchImages(beam.DoFn):
    def __init__(self, policy: FetchPolicy, preprocess: ImagePreprocess, threads: int, progress_interval_s: float,
                 decode: bool = True):
        self._policy, self._preprocess, self._threads, self._interval = policy, preprocess, threads, progress_interval_s
        self._decode = decode
        self._ok = Metrics.counter(NAMESPACE, "images")
        self._failed = Metrics.counter(NAMESPACE, "failed")
        self._timer = StageTimer("fetch_decode")
        self._pool = None
        self._pending: collections.deque = collections.deque()
        self._thumbs = None

    def setup(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="fetch")
        progress.start(self._interval)
        self._thumbs = report_sample.LocalBound()

    def start_bundle(self):
        self._pending = collections.deque()

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _one(self, uri: str, thumbnail: bool):
        """Runs on a pool thread: (result or MediaError, thumbnail or None, wall s, thread CPU s)."""
        wall, cpu, thumb = time.perf_counter(), time.thread_time(), []
        try:
            if not self._decode:
                result = load_image_bytes(uri, self._policy)
                if thumbnail:
                    thumb.append(report_sample.thumbnail_from_bytes(result[0].data, self._policy.max_image_pixels))
            else:
                keep = (lambda image: thumb.append(report_sample.thumbnail_or_none(image))) if thumbnail else None
                result = load_image(uri, self._policy, self._preprocess, keep)
        except MediaError as e:
            result = e
        except Exception as e:  # noqa: BLE001 - a bug in one decode must not fail the batch
            result = MediaError(Reason.DECODE_FAILED, f"{type(e).__name__}: {e}")
        return result, (thumb[0] if thumb else None), time.perf_counter() - wall, time.thread_time() - cpu

    def process(self, items: list[CatalogItem]):
        jobs = [(item, i, resolve_uri(uri, item.base_uri)) for item in items for i, uri in enumerate(item.image_uris)]
        # the report's thumbnail: the first image of items that may be in its sample (smallest id hashes)
        sampled = {item.item_id for item in items if self._thumbs.offer(item.item_id)}
        self._pending.append([(job, self._pool.submit(self._one, job[2], job[1] == 0 and job[0].item_id in sampled))
                              for job in jobs])
        # Batch pipelines run in the global window, so the previous batch's outputs can leave here
        # under this element's window and timestamp.
        while len(self._pending) > 1:
            yield from self._emit(self._pending.popleft())

    def finish_bundle(self):
        while self._pending:
            for out in self._emit(self._pending.popleft()):
                if isinstance(out, beam.pvalue.TaggedOutput):
                    yield beam.pvalue.TaggedOutput(out.tag, GlobalWindows.windowed_value(out.value))
                else:
                    yield GlobalWindows.windowed_value(out)

    def _emit(self, submitted):
        wall = cpu = 0.0
        for (item, index, uri), future in submitted:
            result, thumbnail, job_wall, job_cpu = future.result()
            wall, cpu = wall + job_wall, cpu + job_cpu
            if thumbnail is not None:
                yield beam.pvalue.TaggedOutput(THUMBNAILS, report_sample.Thumbnail(
                    report_sample.sample_key(item.item_id), item.item_id, thumbnail))
            if isinstance(result, MediaError):
                self._failed.inc()
                stage = getattr(result, "stage", None) or (
                    Stage.DECODE if result.reason in (Reason.DECODE_FAILED, Reason.UNSUPPORTED_FORMAT) else Stage.FETCH)
                yield beam.pvalue.TaggedOutput(
                    FAILED, (item.item_id, ItemFailure(stage, result.reason, result.detail, uri, "image")))
                continue
            pixels, digest = result
            self._ok.inc()
            progress.note("images decoded")
            yield beam.pvalue.TaggedOutput(DIGESTS, (item.item_id, MediaDigest("image", index, digest)))
            yield (item.item_id, index), pixels
        # pool threads' time summed per batch (thread CPU; wall is per-image work, so it adds up across threads)
        self._timer.record(wall, cpu, len({job[0].item_id for job, _ in submitted}))


class FetchImages(beam.PTransform):
    """CatalogItem -> {pixels, digests, failed, thumbnails (the report sample's)}; items without images
    pass through untouched."""

    def __init__(self, policy: FetchPolicy, preprocess: ImagePreprocess, threads: int = 8,
                 progress_interval_s: float = 0.0, decode: bool = True, batch: int = 64):
        super().__init__()
        self._fn = _FetchImages(policy, preprocess, threads, progress_interval_s, decode)
        self._batch = batch

    def expand(self, items):
        out = (
            items
            | "WithImages" >> beam.Filter(lambda item: bool(item.image_uris))
            | "BatchForThreads" >> beam.BatchElements(min_batch_size=self._batch, max_batch_size=self._batch)
            | "FetchDecode" >> beam.ParDo(self._fn).with_outputs(DIGESTS, FAILED, THUMBNAILS, main="pixels")
        )
        return {"pixels": out.pixels, "digests": out[DIGESTS], "failed": out[FAILED], "thumbnails": out[THUMBNAILS]}
