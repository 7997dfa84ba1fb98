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

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from apache_beam.transforms.window import GlobalWindows

from encoders.handlers import ImageBytes
from encoders.media import FetchPolicy, MediaError, decode_image, fetch_bytes, probe_image, resolve_uri
from encoders.preprocess import ImagePreprocess
from pipeline import progress
from pipeline.records import ItemFailure, MediaDigest
from schemas.catalog import CatalogItem
from schemas.dead_letter import Reason, Stage

DIGESTS, FAILED = "digests", "failed"
NAMESPACE = "catalog_index.fetch"


def load_image(uri: str, policy: FetchPolicy, preprocess: ImagePreprocess) -> tuple[np.ndarray, str]:
    """One image URI -> (preprocessed pixels, sha256 of its bytes); raises MediaError."""
    data = fetch_bytes(uri, policy)
    digest = hashlib.sha256(data).hexdigest()
    try:
        image = decode_image(data, policy.max_image_pixels)
    except MediaError as e:
        e.stage = Stage.DECODE  # the bytes arrived; decoding (or its pixel cap) failed
        raise
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
        self._pool = None
        self._pending: collections.deque = collections.deque()

    def setup(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="fetch")
        progress.start(self._interval)

    def start_bundle(self):
        self._pending = collections.deque()

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _one(self, uri: str):
        try:
            if not self._decode:
                return load_image_bytes(uri, self._policy)
            return load_image(uri, self._policy, self._preprocess)
        except MediaError as e:
            return e
        except Exception as e:  # noqa: BLE001 - a bug in one decode must not fail the batch
            return MediaError(Reason.DECODE_FAILED, f"{type(e).__name__}: {e}")

    def process(self, items: list[CatalogItem]):
        jobs = [(item, i, resolve_uri(uri, item.base_uri)) for item in items for i, uri in enumerate(item.image_uris)]
        self._pending.append([(job, self._pool.submit(self._one, job[2])) for job in jobs])
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
        for (item, index, uri), future in submitted:
            result = future.result()
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


class FetchImages(beam.PTransform):
    """CatalogItem -> {pixels, digests, failed}; items without images pass through untouched."""

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
            | "FetchDecode" >> beam.ParDo(self._fn).with_outputs(DIGESTS, FAILED, main="pixels")
        )
        return {"pixels": out.pixels, "digests": out[DIGESTS], "failed": out[FAILED]}
