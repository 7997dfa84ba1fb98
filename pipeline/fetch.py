"""Stage 2: fetch, decode and preprocess images on CPU threads.

Outputs ``((item_id, index), pixels)`` ready for the image tower (main),
``(item_id, MediaDigest)`` for the content hash (``digests``) and
``(item_id, ItemFailure)`` for anything that went wrong (``failed``).
Items are fetched in batches on a thread pool: reads wait on I/O and PIL
releases the GIL while decoding, so threads overlap both.
"""
from __future__ import annotations

import concurrent.futures
import hashlib

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from encoders.media import FetchPolicy, MediaError, decode_image, fetch_bytes, resolve_uri
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


class _FetchImages(beam.DoFn):
    def __init__(self, policy: FetchPolicy, preprocess: ImagePreprocess, threads: int, progress_interval_s: float):
        self._policy, self._preprocess, self._threads, self._interval = policy, preprocess, threads, progress_interval_s
        self._ok = Metrics.counter(NAMESPACE, "images")
        self._failed = Metrics.counter(NAMESPACE, "failed")
        self._pool = None

    def setup(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="fetch")
        progress.start(self._interval)

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _one(self, uri: str):
        try:
            return load_image(uri, self._policy, self._preprocess)
        except MediaError as e:
            return e
        except Exception as e:  # noqa: BLE001 - a bug in one decode must not fail the batch
            return MediaError(Reason.DECODE_FAILED, f"{type(e).__name__}: {e}")

    def process(self, items: list[CatalogItem]):
        jobs = [(item, i, resolve_uri(uri, item.base_uri)) for item in items for i, uri in enumerate(item.image_uris)]
        for (item, index, uri), result in zip(jobs, self._pool.map(lambda job: self._one(job[2]), jobs)):
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
                 progress_interval_s: float = 0.0):
        super().__init__()
        self._fn = _FetchImages(policy, preprocess, threads, progress_interval_s)

    def expand(self, items):
        out = (
            items
            | "WithImages" >> beam.Filter(lambda item: bool(item.image_uris))
            | "BatchForThreads" >> beam.BatchElements(min_batch_size=1, max_batch_size=64)
            | "FetchDecode" >> beam.ParDo(self._fn).with_outputs(DIGESTS, FAILED, main="pixels")
        )
        return {"pixels": out.pixels, "digests": out[DIGESTS], "failed": out[FAILED]}
