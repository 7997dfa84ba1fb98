"""Stage 1b (between read and fetch): reuse the previous run's vectors for unchanged items.

A nightly catalog mostly repeats yesterday's. For each current item we
compute its content hash *before* any decode or encode, from its text, a
change token per media object, and the run's model fingerprint (models +
fusion settings). When the previous published run holds a vector for the
item under the same hash, that vector is emitted as it is and the item's
media never reaches fetch, decode or the encoders; new and changed items go
down the normal path; items only in the previous run are counted as deleted
and not carried over.

Change tokens (``--change_detection``):

* ``bytes`` (default): sha256 of the media bytes. Exact: catches new bytes
  behind an unchanged URI. Costs one read of each media object of an item
  that had a vector, but no decode and no encode. The token equals the digest
  that the fetch stage computes, so the pre-computed hash equals the one the
  fuse stage writes for an encoded item.
* ``metadata``: size and last-modified time from the filesystem's metadata
  (``FileSystems.match``; object update time on gs://), no bytes read. Misses
  a rewrite that keeps both size and mtime (tools that preserve mtimes, or
  two writes within the filesystem's time resolution). Where a filesystem
  reports no mtime, and for http(s) media, the token falls back to the bytes.

The logic lives in plain functions (``item_content_hash``, ``media_token``,
``check_compatible``, ``classify``); the DoFns only wrap them.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import time

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from encoders.media import FetchPolicy, MediaError, fetch_bytes, resolve_uri
from pipeline.records import MediaDigest
from pipeline.stage_metrics import StageTimer
from schemas.catalog import CatalogItem
from schemas.dead_letter import Reason
from schemas.embeddings import EmbeddingRecord

CHANGE_DETECTION = ("bytes", "metadata")
NONE = "none"
LATEST = "latest"
NAMESPACE = "catalog_index.incremental"
REUSED, ENCODE, STATUS = "reused", "encode", "status"
STATUSES = ("reused", "new", "changed", "deleted")
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class IncrementalConfig:
    """Which previous run to reuse vectors from, how to detect media changes, how many runs to keep."""

    previous_run: str = LATEST  # 'latest' (the run OUTPUT/LATEST points to), 'none', or a run directory
    change_detection: str = "bytes"
    keep_runs: int = 5  # published runs kept after a new one is published; 0 keeps all

    def __post_init__(self) -> None:
        if not self.previous_run:
            raise ValueError(f"previous_run must be {LATEST!r}, {NONE!r} or a run directory, got an empty string")
        if self.change_detection not in CHANGE_DETECTION:
            raise ValueError(f"change_detection {self.change_detection!r} is not one of {CHANGE_DETECTION}")
        if self.keep_runs < 0:
            raise ValueError(f"keep_runs must be >= 0 (0 keeps every run), got {self.keep_runs}")


@dataclasses.dataclass(frozen=True)
class PreviousRun:
    """The run vectors may be reused from, as resolved when the graph is built."""

    run_dir: str
    run_id: str
    reusable: bool  # False: models, fusion, layout or dtype differ; ids are read only to count
    reason: str = ""  # why not reusable

    def to_json(self) -> dict:
        return {"run_id": self.run_id, "run_dir": self.run_dir, "reusable": self.reusable,
                **({"not_reusable_because": self.reason} if self.reason else {})}


@dataclasses.dataclass(frozen=True)
class PreviousVector:
    """One embeddings row of the previous run, what reuse needs of it."""

    content_hash: str
    model_fingerprint: str
    vector: np.ndarray | None  # None when the previous run is not reusable (ids and hashes only)
    modalities: tuple[str, ...]
    num_images: int
    transcript: str | None = None


# --------------------------------------------------------------------------- plain logic


def media_token(uri: str, mode: str, policy: FetchPolicy = FetchPolicy()) -> str:
    """A token that changes when the media behind ``uri`` changes; raises MediaError if unreadable.

    ``bytes``: sha256 of the bytes (the same digest the fetch stage records).
    ``metadata``: ``meta:<size>:<mtime>`` from filesystem metadata, no bytes read;
    falls back to the bytes for http(s) and for filesystems that report no mtime.
    """
    if mode not in CHANGE_DETECTION:
        raise ValueError(f"change detection {mode!r} is not one of {CHANGE_DETECTION}")
    if mode == "metadata" and not uri.lower().startswith(("http://", "https://")):
        try:
            matched = FileSystems.match([uri])[0].metadata_list
        except Exception as e:  # noqa: BLE001 - filesystems raise their own errors for missing paths
            raise MediaError(Reason.MISSING_MEDIA, f"{uri}: {type(e).__name__}: {e}") from None
        if not matched:
            raise MediaError(Reason.MISSING_MEDIA, f"{uri} does not exist")
        if len(matched) == 1 and matched[0].last_updated_in_seconds:
            meta = matched[0]
            return f"meta:{meta.size_in_bytes}:{meta.last_updated_in_seconds!r}"
    return hashlib.sha256(fetch_bytes(uri, policy)).hexdigest()


def item_content_hash(item: CatalogItem, tokens: list[str], model_fingerprint: str,
                      audio_token: str | None = None) -> str:
    """The item's content hash from one change token per image (in ``image_uris`` order) and its audio's.

    With ``bytes`` tokens this is exactly what the fuse stage writes for an
    encoded item whose media all decoded, which is what makes reuse possible.
    """
    from pipeline.fuse import content_hash

    digests = [MediaDigest("image", i, token) for i, token in enumerate(tokens)]
    if audio_token is not None:
        digests.append(MediaDigest("audio", 0, audio_token))
    return content_hash(item, digests, model_fingerprint)


def hash_item(item: CatalogItem, model_fingerprint: str, mode: str, policy: FetchPolicy,
              media: frozenset[str] = frozenset({"image", "audio"})) -> str | None:
    """The item's content hash, or None when a media object cannot be read (the item is then re-encoded,
    and the normal path dead-letters it or drops the media, as configured).

    ``media`` are the modalities the run fetches: only their tokens enter the
    hash, as only their digests enter the one the fuse stage writes.
    """
    try:
        images = item.image_uris if "image" in media else ()
        tokens = [media_token(resolve_uri(uri, item.base_uri), mode, policy) for uri in images]
        audio = (media_token(resolve_uri(item.audio_uri, item.base_uri), mode, policy)
                 if "audio" in media and item.audio_uri else None)
    except MediaError:
        return None
    return item_content_hash(item, tokens, model_fingerprint, audio)


def check_compatible(previous_manifest: dict, metadata: dict, vector_dtype: str) -> str:
    """Why the previous run's vectors cannot stand in for this run's ('' when they can).

    The content hash already covers models and fusion; this catches what it does
    not (layout, dtype) and states the reason for the manifest.
    """
    if previous_manifest.get("model_fingerprint") != metadata["model_fingerprint"]:
        return "model or fusion settings changed (model_fingerprint differs)"
    if previous_manifest.get("layout") != metadata["layout"]:
        return "vector layout differs"
    previous_dtype = (previous_manifest.get("embeddings") or {}).get("dtype")
    if previous_dtype != vector_dtype:
        return f"vector dtype differs ({previous_dtype} -> {vector_dtype})"
    return ""


def classify(item: CatalogItem | None, previous: PreviousVector | None, current_hash: str | None,
             model_fingerprint: str) -> str:
    """One of 'reused', 'new', 'changed', 'deleted' for an item id seen in either run."""
    if item is None:
        return "deleted"
    if previous is None:
        return "new"
    if (previous.vector is not None and current_hash is not None and previous.content_hash == current_hash
            and previous.model_fingerprint == model_fingerprint):
        return "reused"
    return "changed"


def resolve_previous_run(output: str, previous_run: str, run_dir: str, metadata: dict,
                         vector_dtype: str) -> PreviousRun | None:
    """The published run to compare with, or None (first run, or ``none``).

    Only a published run (one with a manifest) is used; a named directory
    without one is an error, since reusing half a run would be wrong.
    """
    from pipeline.publish import MANIFEST, latest_run_dir, read_manifest

    if previous_run == NONE:
        return None
    directory = latest_run_dir(output) if previous_run == LATEST else previous_run.rstrip("/")
    if directory is None:
        return None
    if not FileSystems.exists(f"{directory}/{MANIFEST}"):
        if previous_run == LATEST:
            _LOG.warning("LATEST points to %s, which has no manifest; encoding everything", directory)
            return None
        raise ValueError(f"--previous_run {previous_run!r} is not a published run (no {MANIFEST} in it)")
    manifest = read_manifest(directory)
    if directory.rstrip("/") == run_dir.rstrip("/"):
        return PreviousRun(directory, manifest.get("run_id", ""), False, "it is the run being written")
    reason = check_compatible(manifest, metadata, vector_dtype)
    return PreviousRun(directory, manifest.get("run_id", ""), not reason, reason)


def previous_embedding_files(previous: PreviousRun) -> list[str]:
    """The embeddings shards the previous run's manifest lists (exactly what was published)."""
    from pipeline.publish import read_manifest

    files = read_manifest(previous.run_dir).get("files", [])
    return [f"{previous.run_dir}/{f['path']}" for f in files if f["path"].startswith("embeddings/")]


def read_previous_rows(path: str, with_vectors: bool):
    """(item_id, PreviousVector) for every row of one embeddings shard, a row group at a time."""
    from schemas.embeddings import vectors_of

    columns = ["item_id", "content_hash", "model_fingerprint", "modalities", "num_images", "transcript"]
    if with_vectors:
        columns.append("vector")
    with FileSystems.open(path, compression_type="uncompressed") as stream:
        parquet = pq.ParquetFile(stream)
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=columns)
            vectors = vectors_of(table) if with_vectors else None
            for i, row in enumerate(table.drop(["vector"] if with_vectors else []).to_pylist()):
                yield row["item_id"], PreviousVector(
                    content_hash=row["content_hash"], model_fingerprint=row["model_fingerprint"],
                    vector=vectors[i].copy() if vectors is not None else None,
                    modalities=tuple(row["modalities"]), num_images=int(row["num_images"]),
                    transcript=row["transcript"])


# --------------------------------------------------------------------------- Beam wrappers


class _ReadPrevious(beam.DoFn):
    def __init__(self, with_vectors: bool):
        self._with_vectors = with_vectors
        self._rows = Metrics.counter(NAMESPACE, "previous_rows")

    def process(self, path: str):
        for element in read_previous_rows(path, self._with_vectors):
            self._rows.inc()
            yield element


def _pair(element):
    """CoGroupByKey output -> (item or None, previous or None)."""
    item_id, grouped = element
    items, previous = list(grouped["item"]), list(grouped["previous"])
    if len(items) > 1 or len(previous) > 1:
        raise RuntimeError(f"item id {item_id!r} appears {len(items)} times in the catalog and "
                           f"{len(previous)} times in the previous run; ids must be unique")
    return (items[0] if items else None), (previous[0] if previous else None)


class _Decide(beam.DoFn):
    """Batches of (item, previous) -> reused records, items to encode, and one status per item id.

    Hashing reads media (bytes mode) or stats it (metadata mode): a thread pool
    overlaps the I/O, as the fetch stage does.
    """

    def __init__(self, model_fingerprint: str, mode: str, policy: FetchPolicy, hash_new: bool,
                 media: frozenset[str], threads: int = 8):
        self._fp, self._mode, self._policy, self._hash_new, self._threads = (
            model_fingerprint, mode, policy, hash_new, threads)
        self._media = media
        self._counters = {s: Metrics.counter(NAMESPACE, s) for s in STATUSES}
        self._timer = StageTimer("incremental")
        self._pool = None

    def setup(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="hash")

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _needs_hash(self, item, previous) -> bool:
        # A new item is encoded whatever its hash; it is only hashed here when the
        # fuse stage cannot derive the same hash itself (metadata tokens).
        return item is not None and ((previous is not None and previous.vector is not None) or self._hash_new)

    def _hash(self, pair):
        item, previous = pair
        if not self._needs_hash(item, previous):
            return None
        return hash_item(item, self._fp, self._mode, self._policy, self._media)

    def _timed_hash(self, pair):
        wall, cpu = time.perf_counter(), time.thread_time()
        return self._hash(pair), time.perf_counter() - wall, time.thread_time() - cpu

    def process(self, pairs: list):
        timed = list(self._pool.map(self._timed_hash, pairs))
        # the pool threads' hashing time per batch, recorded here: Beam's metric containers are per thread
        self._timer.record(sum(t[1] for t in timed), sum(t[2] for t in timed), len(pairs))
        for (item, previous), (current_hash, _, _) in zip(pairs, timed):
            status = classify(item, previous, current_hash, self._fp)
            self._counters[status].inc()
            yield beam.pvalue.TaggedOutput(STATUS, status)
            if status == "deleted":
                continue
            if status == "reused":
                yield beam.pvalue.TaggedOutput(REUSED, EmbeddingRecord(
                    item_id=item.item_id, vector=previous.vector, modalities=previous.modalities,
                    content_hash=current_hash, model_fingerprint=self._fp, num_images=previous.num_images,
                    attributes=item.attributes,  # attributes are today's: they are not part of the vector
                    transcript=previous.transcript))
                continue
            if self._mode == "metadata" and current_hash is not None:
                # fuse would hash the fetched bytes; tomorrow compares metadata tokens, so carry ours
                item = dataclasses.replace(item, content_hash=current_hash)
            yield beam.pvalue.TaggedOutput(ENCODE, item)


class Incremental(beam.PTransform):
    """CatalogItem -> {encode: items for the normal path, reused: EmbeddingRecord, status: str per item id}.

    ``status`` has one element per current item (reused/new/changed) and one per
    deleted previous item; the publish step counts them into the manifest.
    """

    def __init__(self, config: IncrementalConfig, previous: PreviousRun | None, model_fingerprint: str,
                 policy: FetchPolicy, media: frozenset[str] = frozenset({"image", "audio"})):
        super().__init__()
        self._config, self._previous = config, previous
        self._fn = _Decide(model_fingerprint, config.change_detection, policy,
                           hash_new=config.change_detection == "metadata", media=frozenset(media))

    def expand(self, items):
        p = items.pipeline
        if self._previous is None:
            pairs = items | "NoPrevious" >> beam.Map(lambda item: (item, None))
        else:
            files = previous_embedding_files(self._previous)
            previous = (
                p
                | "PreviousFiles" >> beam.Create(files)
                | "SpreadFiles" >> beam.Reshuffle()
                | "ReadPrevious" >> beam.ParDo(_ReadPrevious(self._previous.reusable))
            )
            pairs = (
                {"item": items | "KeyItems" >> beam.Map(lambda item: (item.item_id, item)), "previous": previous}
                | "JoinPrevious" >> beam.CoGroupByKey()
                | "Pair" >> beam.Map(_pair)
            )
        out = (
            pairs
            | "BatchForThreads" >> beam.BatchElements(min_batch_size=1, max_batch_size=64)
            | "Decide" >> beam.ParDo(self._fn).with_outputs(REUSED, ENCODE, STATUS)
        )
        return {"encode": out[ENCODE], "reused": out[REUSED], "status": out[STATUS]}


def incremental_counts(statuses: dict, encoded: int, embedded: int, previous: PreviousRun | None,
                       config: IncrementalConfig) -> dict:
    """The manifest's ``counts.incremental`` block; checks that reused + encoded == embedded."""
    block = {s: int(statuses.get(s, 0)) for s in STATUSES}
    block["encoded"] = int(encoded)
    if block["reused"] + block["encoded"] != embedded:
        from pipeline.publish import AccountingError

        raise AccountingError(f"{block['reused']} reused + {encoded} encoded != {embedded} embedded")
    block["previous_run"] = previous.to_json() if previous is not None else None
    block["change_detection"] = config.change_detection
    return block
