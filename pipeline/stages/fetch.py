"""Fetch, decode and preprocess a batch's images on CPU threads (plain functions, no Beam).

The embed stage (``pipeline/stages/embed.py``) calls :class:`ImageFetcher` once per
batch of items: every image URI of the batch is read and decoded on a thread
pool (reads wait on I/O; PIL releases the GIL while it decodes and resizes),
and each image comes back as uint8 ``[S, S, 3]`` pixels ready for one
vectorized normalize over the batch, or as the :class:`MediaError` it hit.

Local files (and cached media) are CPU work: they are split into one chunk per
core that the DoFn's own thread leaves free (:func:`local_decode_threads`),
each decoded one image after another by one thread, so the decoding threads
never oversubscribe the cores and the pool's hand-offs are per chunk, not per
image (on 2 cores, one job per image on 8 threads cost ~0.4 CPU-ms more per
image item: docs/BENCHMARKS.md). Remote media (gs://, s3://, http) wait on the
network, so each remote image is its own job, up to ``--decode_threads`` at a
time.
With ``--decode_processes N`` local images go to N decoding processes instead
(``pipeline/stages/decode_pool.py``: no GIL shared with the DoFn's thread).
With ``decode=False`` (``--image_decode gpu``) the threads only read bytes and
check headers; the image handler decodes the batch on the GPU (nvJPEG).

:func:`encoders.media.decode_for_tower` is the only place an image is decoded for
a tower (items, queries, fit-fusion, the GPU path's fallback): a hook on
decoded media (thumbnails) goes there.
"""
from __future__ import annotations

import concurrent.futures
import logging
from concurrent.futures.process import BrokenProcessPool
import os
from typing import NamedTuple, Sequence

from encoders.handlers import ImageBytes
from encoders.digest import sha256_hex
from encoders.media import FetchPolicy, MediaError, fetch_bytes, probe_image, resolve_uri, uri_scheme
from encoders.preprocess import ImagePreprocess
from pipeline.stages import faults
from pipeline.stages.decode_pool import DecodePool, decode_chunk, new_pool, timed_load
from schemas.catalog import CatalogItem
from schemas.dead_letter import Reason, Stage

NAMESPACE = "catalog_index.fetch"
_log = logging.getLogger(__name__)
DIED = "the decoding process died while decoding this image (--decode_processes)"
# a process that died, or a pool another DoFn of this process found broken and shut down (its work cancelled)
_CHUNK_LOST = (BrokenProcessPool, concurrent.futures.CancelledError)


def load_image_bytes(uri: str, policy: FetchPolicy, digest: bool = True) -> tuple[ImageBytes, str]:
    """One image URI -> (its bytes, header checked but not decoded; sha256 or ''); raises MediaError."""
    data = fetch_bytes(uri, policy)
    probe_image(data, policy.max_image_pixels)
    return ImageBytes(uri, data), sha256_hex(data) if digest else ""


def failure_stage(error: MediaError) -> Stage:
    """FETCH or DECODE for a media error, from where it was raised or else from its reason."""
    return getattr(error, "stage", None) or (
        Stage.DECODE if error.reason in (Reason.DECODE_FAILED, Reason.UNSUPPORTED_FORMAT) else Stage.FETCH)


class ImageJob(NamedTuple):
    """One image of one item of the batch: ``item`` is the item's position in the batch (a NamedTuple: one is
    made per image, see ``stages/records.py``)."""

    item: int
    index: int
    uri: str


def image_jobs(items: Sequence[CatalogItem]) -> list[ImageJob]:
    return [ImageJob(pos, i, resolve_uri(uri, item.base_uri))
            for pos, item in enumerate(items) for i, uri in enumerate(item.image_uris)]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def local_decode_threads(decode_threads: int, cores: int | None = None) -> int:
    """Threads that decode a batch's local images: the cores left beside the DoFn's own thread, at least 1.

    The DoFn's thread runs Beam, fusion and the model (or feeds the GPU) while
    the next batch decodes; one more decoding thread than the cores left
    oversubscribes them. Measured on 2 cores (docs/BENCHMARKS.md): 1 decoding
    thread cost ~10% less CPU per image item than 2 and lost ~7% of the
    items/s; decoding in the DoFn's own thread cost the same CPU as 1 and was
    slower. Never more than ``--decode_threads``.
    """
    cores = usable_cores() if cores is None else cores
    return max(1, min(decode_threads, cores - 1))


def is_local(uri: str) -> bool:
    """A local path or file: URI: reading it is CPU work, not a wait on the network."""
    return uri_scheme(uri) in ("", "file")


def chunks(jobs: Sequence[int], count: int) -> list[list[int]]:
    """``jobs`` cut into at most ``count`` contiguous chunks of near-equal size, none empty."""
    count = max(1, min(count, len(jobs)))
    size, extra = divmod(len(jobs), count)
    out, start = [], 0
    for k in range(count):
        end = start + size + (1 if k < extra else 0)
        out.append(list(jobs[start:end]))
        start = end
    return [c for c in out if c]


class ImageFetcher:
    """Runs a batch's image jobs on ``pool``; ``submit`` returns at once, ``collect`` waits.

    ``local_threads``: how many chunks a batch's local images are cut into (at
    most that many pool threads decode them at once); 0 means the usable
    cores. Remote images are one job each, as many at a time as the pool has
    threads (``--decode_threads``). ``processes`` > 0 (``--decode_processes``,
    decoding on the CPU): local images are cut into that many chunks and
    decoded by the process-wide :class:`DecodePool` instead of the threads.
    """

    def __init__(self, policy: FetchPolicy, preprocess: ImagePreprocess | None, decode: bool = True,
                 local_threads: int = 0, processes: int = 0):
        self._policy, self._preprocess, self._decode = policy, preprocess, decode
        self._local_threads = local_threads if local_threads > 0 else usable_cores()
        self._processes = processes if decode else 0  # undecoded bytes (--image_decode gpu) stay on threads

    def _one(self, uri: str, digest: bool = True):
        return timed_load(load_image_bytes, uri, self._policy, digest)

    def _chunk(self, uris: list[str], undigested: frozenset[int] = frozenset()) -> list[tuple[object, float]]:
        if self._decode:
            return decode_chunk(uris, undigested, self._policy, self._preprocess)
        return [self._one(uri, k not in undigested) for k, uri in enumerate(uris)]

    def submit(self, pool, items: Sequence[CatalogItem]):
        """Starts the batch's jobs. An image's sha256 only feeds its item's content hash: an item that arrives
        with its hash (``--change_detection metadata`` computed it before fetch) gets '' instead."""
        jobs = image_jobs(items)
        local = [k for k, job in enumerate(jobs) if is_local(job.uri)]
        remote = [k for k, job in enumerate(jobs) if not is_local(job.uri)]
        processes = self._pool_or_none() if self._processes and local else None
        submitted = []
        for group in chunks(local, self._processes or self._local_threads) + [[k] for k in remote]:
            uris = [jobs[k].uri for k in group]
            undigested = frozenset(i for i, k in enumerate(group) if items[jobs[k].item].content_hash)
            if processes is not None and is_local(uris[0]):
                processes, future = self._to_processes(processes, uris, undigested)
                if future is not None:
                    submitted.append((group, future, (processes, self, uris, undigested)))
                    continue
                processes = None  # no decoding process could be started: the threads decode the rest
            submitted.append((group, pool.submit(self._chunk, uris, undigested), None))
        return jobs, submitted

    def _pool_or_none(self):
        try:
            return DecodePool.get(self._processes)
        except Exception as e:  # noqa: BLE001 - no process support (no semaphores, a sandbox): the threads decode
            _log.warning("decoding processes cannot be started (%s); local images decode on the fetch threads", e)
            return None

    def _to_processes(self, processes, uris, undigested):
        """(pool, future) of a local chunk sent to the decoding processes; a pool that broke (or that another
        DoFn replaced) since the last batch is replaced once, and ``(None, None)`` if the new one fails too."""
        error: Exception | None = None
        for attempt in range(2):
            try:
                return processes, processes.submit(decode_chunk, uris, undigested, self._policy, self._preprocess,
                                                   faults.spec())
            except Exception as e:  # noqa: BLE001 - broken, shut down by another DoFn, or a fork that failed (EOFError)
                error = e
                DecodePool.discard(processes)
                processes = self._pool_or_none() if attempt == 0 else None
                if processes is None:
                    break
        # a new pool failed too: this fetcher stops trying (one line, not two failed pools per batch)
        self._processes = 0
        reason = " ".join(str(error).split())[:300]  # one line: some (multiprocessing's) span a paragraph
        _log.warning("decoding processes cannot be used (%s: %s); local images decode on the fetch threads",
                     type(error).__name__, reason)
        return None, None

    def _one_by_one(self, broken, uris: list[str], undigested: frozenset[int]) -> list[tuple[object, float]]:
        """A chunk whose decoding process died, decoded again one image at a time in a process of its own.

        The process is private to this call (``new_pool(1)``, not the shared pool
        that other DoFns' chunks use), and each new one first runs an empty job:
        so a death is the image's own. That image is a ``decode_failed`` error (a
        decoder that crashes on it, or one too large for the process's memory),
        and a new process takes the next one. One poisonous image costs its
        item, never its batch-mates, another batch's images or the worker. Where
        no healthy process starts (processes die whatever they run), nothing is
        blamed and this thread decodes the rest.
        """
        _log.warning("a decoding process died or was replaced; decoding its chunk of %d images again, one image "
                     "per job", len(uris))
        DecodePool.discard(broken)
        outs: list[tuple[object, float]] = []
        own = None
        try:
            for k, uri in enumerate(uris):
                own = own or self._healthy_private_pool()
                skip_digest = frozenset({0}) if k in undigested else frozenset()
                try:
                    future = own.submit(decode_chunk, [uri], skip_digest, self._policy, self._preprocess,
                                        faults.spec()) if own is not None else None
                except Exception:  # noqa: BLE001 - it broke while idle: as if none started
                    future = None
                if future is None:
                    return outs + self._chunk(uris[k:], frozenset(i - k for i in undigested if i >= k))
                try:
                    outs.extend(future.result())
                except BrokenProcessPool:
                    own.shutdown(wait=False)
                    own = None
                    error = MediaError(Reason.DECODE_FAILED, f"{uri}: {DIED}")
                    error.stage = Stage.DECODE
                    outs.append((error, 0.0))
            return outs
        finally:
            if own is not None:
                own.shutdown(wait=False)

    def _healthy_private_pool(self):
        """A new one-process pool that has run an empty job, or None (it could not start, or its process died)."""
        pool = None
        try:
            pool = self._private_pool()
            pool.submit(int).result()
            return pool
        except Exception as e:  # noqa: BLE001 - see the docstring
            _log.warning("a new decoding process does not run (%s: %s)", type(e).__name__, e)
            if pool is not None:
                pool.shutdown(wait=False)
            return None

    @staticmethod
    def _private_pool():
        return new_pool(1)

    @staticmethod
    def collect(submitted) -> tuple[list[tuple[ImageJob, object]], float]:
        """[(job, (pixels | ImageBytes, sha256) or MediaError)] in the batch's job order, and the threads'
        CPU seconds.

        A chunk whose decoding process died (killed, out of memory, a crash in a
        decoder) is decoded again one image at a time in new processes
        (:meth:`_one_by_one`): an image that kills its process again becomes a
        ``decode_failed`` dead letter, and its batch-mates are decoded as usual.
        """
        jobs, groups = submitted
        found: list[object] = [None] * len(jobs)
        cpu = 0.0
        for group, future, fallback in groups:
            try:
                outs = future.result()
            except _CHUNK_LOST:
                if fallback is None:
                    raise
                broken, fetcher, uris, undigested = fallback
                outs = fetcher._one_by_one(broken, uris, undigested)
            for k, (out, seconds) in zip(group, outs):
                found[k] = out
                cpu += seconds
        return list(zip(jobs, found)), cpu
