"""Fetch and decode a batch's audio clips on CPU threads (plain functions, no Beam).

Each clip comes back as a mono :class:`AudioClip` at every rate the run's
audio models want, or as the :class:`MediaError` it hit. Threads overlap I/O;
libsndfile and soxr release the GIL while they decode and resample.
"""
from __future__ import annotations

from typing import Sequence

from encoders.audio import AudioClip, AudioPolicy, decode_audio
from encoders.digest import sha256_hex
from encoders.media import FetchPolicy, MediaError, fetch_bytes, resolve_uri
from pipeline.stages.decode_pool import timed_load
from schemas.catalog import CatalogItem
from schemas.dead_letter import Reason, Stage

NAMESPACE = "catalog_index.fetch_audio"
DECODE_REASONS = (Reason.DECODE_FAILED, Reason.UNSUPPORTED_FORMAT, Reason.AUDIO_TOO_LONG, Reason.SILENT_AUDIO)


def load_audio(uri: str, fetch: FetchPolicy, audio: AudioPolicy, rates: tuple[int, ...],
               digest: bool = True) -> tuple[AudioClip, str]:
    """One audio URI -> (decoded clip, sha256 of its bytes or '' without ``digest``); raises MediaError."""
    data = fetch_bytes(uri, fetch)
    return decode_audio(data, rates, audio), sha256_hex(data) if digest else ""


def audio_failure_stage(error: MediaError) -> Stage:
    return Stage.DECODE if error.reason in DECODE_REASONS else Stage.FETCH


class AudioFetcher:
    """Runs a batch's audio jobs (one per item with a clip) on a pool; ``submit`` / ``collect``."""

    def __init__(self, fetch: FetchPolicy, audio: AudioPolicy, rates: tuple[int, ...]):
        if not rates:
            raise ValueError("the audio fetcher needs at least one target sample rate")
        self._fetch, self._audio, self._rates = fetch, audio, tuple(sorted(set(rates)))

    def _one(self, uri: str, digest: bool = True):
        return timed_load(load_audio, uri, self._fetch, self._audio, self._rates, digest)

    def submit(self, pool, items: Sequence[CatalogItem]):
        """Starts the batch's jobs; like the images' (``stages/fetch.py``), a clip of an item that arrives with its
        content hash is not hashed again (its digest would feed nothing)."""
        jobs = [(pos, resolve_uri(item.audio_uri, item.base_uri)) for pos, item in enumerate(items) if item.audio_uri]
        return jobs, [pool.submit(self._one, uri, not items[pos].content_hash) for pos, uri in jobs]

    @staticmethod
    def collect(submitted) -> tuple[list[tuple[int, str, object]], float]:
        """[(item position, uri, (clip, sha256) or MediaError)], and the threads' CPU seconds."""
        jobs, futures = submitted
        results, cpu = [], 0.0
        for (pos, uri), future in zip(jobs, futures):
            out, seconds = future.result()
            results.append((pos, uri, out))
            cpu += seconds
        return results, cpu
