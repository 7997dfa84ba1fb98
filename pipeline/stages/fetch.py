"""Fetch, decode and preprocess a batch's images on CPU threads (plain functions, no Beam).

The embed stage (``pipeline/stages/embed.py``) calls :class:`ImageFetcher` once per
batch of items: every image URI of the batch is read and decoded on a thread
pool (reads wait on I/O; PIL releases the GIL while it decodes and resizes),
and each image comes back as uint8 ``[S, S, 3]`` pixels ready for one
vectorized normalize over the batch, or as the :class:`MediaError` it hit.
With ``decode=False`` (``--image_decode gpu``) the threads only read bytes and
check headers; the image handler decodes the batch on the GPU (nvJPEG).

:func:`encoders.media.decode_for_tower` is the only place an image is decoded for
a tower (items, queries, fit-fusion, the GPU path's fallback): a hook on
decoded media (thumbnails) goes there.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np

from encoders.handlers import ImageBytes
from encoders import media
from encoders.digest import sha256_hex
from encoders.media import FetchPolicy, MediaError, fetch_bytes, probe_image, resolve_uri
from encoders.preprocess import ImagePreprocess
from schemas.catalog import CatalogItem
from schemas.dead_letter import Reason, Stage

NAMESPACE = "catalog_index.fetch"


def decode_for_tower(data: bytes, preprocess: ImagePreprocess, max_pixels: int) -> np.ndarray:
    """Encoded image -> uint8 [S, S, 3] for the tower; JPEGs decode at reduced scale when much larger.

    Raises MediaError with ``stage`` DECODE (the bytes arrived; decoding or its pixel cap failed).
    """
    try:
        return media.decode_for_tower(data, preprocess, max_pixels)
    except MediaError as e:
        e.stage = Stage.DECODE
        raise


def load_image_u8(uri: str, policy: FetchPolicy, preprocess: ImagePreprocess) -> tuple[np.ndarray, str]:
    """One image URI -> (uint8 [S, S, 3] pixels, sha256 of its bytes); raises MediaError."""
    data = fetch_bytes(uri, policy)
    return decode_for_tower(data, preprocess, policy.max_image_pixels), sha256_hex(data)


def load_image_bytes(uri: str, policy: FetchPolicy) -> tuple[ImageBytes, str]:
    """One image URI -> (its bytes, header checked but not decoded; sha256); raises MediaError."""
    data = fetch_bytes(uri, policy)
    probe_image(data, policy.max_image_pixels)
    return ImageBytes(uri, data), sha256_hex(data)


def timed_load(load, *args):
    """``(load(*args) or the MediaError it became, this thread's CPU seconds)``, for a fetch thread pool.

    Any other exception is a ``decode_failed`` MediaError too: a bug in one
    decode must not fail the batch it belongs to.
    """
    started = time.thread_time()
    try:
        out = load(*args)
    except MediaError as e:
        out = e
    except Exception as e:  # noqa: BLE001 - see the docstring
        out = MediaError(Reason.DECODE_FAILED, f"{type(e).__name__}: {e}")
    return out, time.thread_time() - started


def failure_stage(error: MediaError) -> Stage:
    """FETCH or DECODE for a media error, from where it was raised or else from its reason."""
    return getattr(error, "stage", None) or (
        Stage.DECODE if error.reason in (Reason.DECODE_FAILED, Reason.UNSUPPORTED_FORMAT) else Stage.FETCH)


@dataclasses.dataclass(frozen=True)
class ImageJob:
    """One image of one item of the batch: ``item`` is the item's position in the batch."""

    item: int
    index: int
    uri: str


def image_jobs(items: Sequence[CatalogItem]) -> list[ImageJob]:
    return [ImageJob(pos, i, resolve_uri(uri, item.base_uri))
            for pos, item in enumerate(items) for i, uri in enumerate(item.image_uris)]


class ImageFetcher:
    """Runs a batch's image jobs on ``pool``; ``submit`` returns at once, ``collect`` waits."""

    def __init__(self, policy: FetchPolicy, preprocess: ImagePreprocess | None, decode: bool = True):
        self._policy, self._preprocess, self._decode = policy, preprocess, decode

    def _one(self, uri: str):
        if not self._decode:
            return timed_load(load_image_bytes, uri, self._policy)
        return timed_load(load_image_u8, uri, self._policy, self._preprocess)

    def submit(self, pool, items: Sequence[CatalogItem]):
        jobs = image_jobs(items)
        return jobs, [pool.submit(self._one, job.uri) for job in jobs]

    @staticmethod
    def collect(submitted) -> tuple[list[tuple[ImageJob, object]], float]:
        """[(job, (pixels | ImageBytes, sha256) or MediaError)], and the threads' CPU seconds."""
        jobs, futures = submitted
        results, cpu = [], 0.0
        for job, future in zip(jobs, futures):
            out, seconds = future.result()
            results.append((job, out))
            cpu += seconds
        return results, cpu
