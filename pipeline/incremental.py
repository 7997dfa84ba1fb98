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

import collections
import concurrent.futures
import dataclasses
import hashlib
import logging

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from encoders.media import FetchPolicy, MediaError, fetch_bytes, resolve_uri
from pipeline import progress
from pipeline.records import MediaDigest
from pipeline.stage_metrics import StageTimer
from schemas.catalog import CatalogItem
from schemas.dead_letter import DeadLetter, Reason, Stage
from schemas.embeddings import EmbeddingRecord, display_fields
from schemas.manifest import Manifest

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


def check_compatible(previous_manifest: Manifest, metadata: dict, vector_dtype: str) -> str:
    """Why the previous run's vectors cannot stand in for this run's ('' when they can).

    The content hash already covers models and fusion; this catches what it does
    not (layout, dtype) and states the reason for the manifest.
    """
    if previous_manifest.model_fingerprint != metadata["model_fingerprint"]:
        return "model or fusion settings changed (model_fingerprint differs)"
    if previous_manifest.layout != metadata["layout"]:
        return "vector layout differs"
    previous_dtype = previous_manifest.embeddings.dtype if previous_manifest.embeddings else None
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
        return PreviousRun(directory, manifest.run_id, False, "it is the run being written")
    reason = check_compatible(manifest, metadata, vector_dtype)
    return PreviousRun(directory, manifest.run_id, not reason, reason)


def resume_pieces(run_dir: str) -> list[str]:
    """Embeddings pieces a killed attempt of this run left behind (none once the run is published).

    A rerun with the same ``--run_id`` reuses the rows in them whose content
    hash still matches, instead of encoding those items again.
    """
    from pipeline.publish import MANIFEST
    from pipeline.write import PIECES

    run_dir = run_dir.rstrip("/")
    try:
        if FileSystems.exists(f"{run_dir}/{MANIFEST}"):
            return []
    except ValueError as e:  # no filesystem for the scheme here (a launcher without the gcp extra)
        _LOG.warning("cannot look for a killed attempt's pieces under %s (%s); encoding everything", run_dir, e)
        return []
    try:
        matched = FileSystems.match([f"{run_dir}/embeddings/{PIECES}/*.arrow"])[0].metadata_list
    except Exception:  # noqa: BLE001 - no such directory: nothing to resume
        return []
    return sorted(m.path for m in matched)


def read_piece_rows(path: str):
    """(item_id, PreviousVector) for every row of one embeddings piece (Arrow IPC)."""
    from pipeline.write import _open_piece
    from schemas.embeddings import vectors_of

    table = _open_piece(path)
    vectors = vectors_of(table)
    for i, row in enumerate(table.drop(["vector", "attributes"]).to_pylist()):
        yield row["item_id"], PreviousVector(
            content_hash=row["content_hash"], model_fingerprint=row["model_fingerprint"],
            vector=vectors[i].copy(), modalities=tuple(row["modalities"]), num_images=int(row["num_images"]),
            transcript=row["transcript"])


def previous_embedding_files(previous: PreviousRun) -> list[str]:
    """The embeddings shards the previous run's manifest lists (exactly what was published)."""
    from pipeline.publish import read_manifest

    return [f"{previous.run_dir}/{path}" for path in read_manifest(previous.run_dir).file_paths("embeddings/")]


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


PREVIOUS = "p"  # tag of a previous-run row in the join by item id (catalog items are "c", pipeline.read)
RESUMED = "r"  # tag of a row a killed attempt of this run already wrote
DEAD = "dead"


def _source_order(item: CatalogItem) -> tuple[str, int]:
    path, _, row = item.source.rpartition("#")
    return path, int(row) if row.isdigit() else 0


def resolve_duplicates(item_id: str, items: list[CatalogItem]) -> tuple[CatalogItem, list[DeadLetter]]:
    """Of several rows with one item id, the first by (file, row) is kept; the rest are dead letters."""
    ordered = sorted(items, key=_source_order)
    return ordered[0], [DeadLetter(item_id, Stage.VALIDATE, Reason.DUPLICATE_ID,
                                   f"item id also at {ordered[0].source}; first occurrence kept", dup.source)
                        for dup in ordered[1:]]


def _as_tuple(previous: PreviousVector) -> tuple:
    return (previous.content_hash, previous.model_fingerprint, previous.vector, previous.modalities,
            previous.num_images, previous.transcript)


class _ReadPrevious(beam.DoFn):
    def __init__(self, with_vectors: bool):
        self._with_vectors = with_vectors
        self._rows = Metrics.counter(NAMESPACE, "previous_rows")

    def process(self, path: str):
        for item_id, previous in read_previous_rows(path, self._with_vectors):
            self._rows.inc()
            yield item_id, (PREVIOUS, _as_tuple(previous))


class _ReadResumed(beam.DoFn):
    def __init__(self):
        self._rows = Metrics.counter(NAMESPACE, "resume_rows")

    def process(self, path: str):
        for item_id, row in read_piece_rows(path):
            self._rows.inc()
            yield item_id, (RESUMED, _as_tuple(row))


class _Resolve(beam.DoFn):
    """Joined groups (item id -> catalog rows and previous row) -> batches to encode, reused rows, statuses.

    Per item id: duplicates resolved (first by file and row), then, a batch of
    ``batch_items`` ids at a time, each item classified reused / new / changed
    (deleted for ids only in the previous run). Hashing reads media (bytes
    mode) or stats it (metadata mode): a thread pool overlaps the I/O.
    Outputs: main, ``list[CatalogItem]`` batches to encode; ``reused``, one
    ``pa.Table`` of reused rows per batch; ``status``, a {status: count} dict
    per batch; ``dead``, duplicate-id dead letters.
    """

    def __init__(self, model_fingerprint: str, mode: str, policy: FetchPolicy, hash_new: bool,
                 media: frozenset[str], schema, batch_items: int, threads: int = 8):
        self._fp, self._mode, self._policy, self._hash_new, self._threads = (
            model_fingerprint, mode, policy, hash_new, threads)
        self._media, self._schema, self._batch_items = media, schema, batch_items
        self._pool = None
        self._buffer: list = []

    def setup(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="hash")
        self._counters = {s: Metrics.counter(NAMESPACE, s) for s in (*STATUSES, "resumed")}
        self._duplicates = Metrics.counter("catalog_index.read", "duplicate_ids")
        self._timer = StageTimer("incremental")

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def start_bundle(self):
        self._buffer = []

    def process(self, element):
        from pipeline.records import item_from_tuple

        item_id, values = element
        current, previous, resumed = [], [], []
        for tag, value in values:
            (previous if tag == PREVIOUS else resumed if tag == RESUMED else current).append(value)
        if len(previous) > 1:
            raise RuntimeError(f"item id {item_id!r} appears {len(previous)} times in the previous run; "
                               "ids must be unique")
        item = None
        if current:
            item, duplicates = resolve_duplicates(item_id, [item_from_tuple(t) for t in current])
            for dead in duplicates:
                self._duplicates.inc()
                progress.note(progress.REJECTED)
                yield beam.pvalue.TaggedOutput(DEAD, dead)
        # a killed attempt may have written an item twice (a retried bundle): the rows are equal, take one
        self._buffer.append((item, PreviousVector(*previous[0]) if previous else None,
                             PreviousVector(*resumed[0]) if resumed and item is not None else None))
        if len(self._buffer) >= self._batch_items:
            yield from self._flush()

    def finish_bundle(self):
        for out in self._flush():
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(out.tag, GlobalWindows.windowed_value(out.value))
            else:
                yield GlobalWindows.windowed_value(out)

    def _needs_hash(self, item, previous, resumed=None) -> bool:
        # A new item is encoded whatever its hash; it is only hashed here when the
        # fuse stage cannot derive the same hash itself (metadata tokens).
        return item is not None and ((previous is not None and previous.vector is not None) or self._hash_new
                                     or resumed is not None)

    def _hash(self, pair):
        item, previous, resumed = pair
        if not self._needs_hash(item, previous, resumed):
            return None
        return hash_item(item, self._fp, self._mode, self._policy, self._media)

    def _flush(self):
        from schemas.embeddings import records_to_table

        pairs, self._buffer = self._buffer, []
        if not pairs:
            return
        with self._timer.batch(len(pairs)):
            if any(self._needs_hash(*pair) for pair in pairs):
                hashes = list(self._pool.map(self._hash, pairs))
            else:
                hashes = [None] * len(pairs)
            statuses: collections.Counter = collections.Counter()
            reused, encode = [], []
            for (item, previous, resumed), current_hash in zip(pairs, hashes):
                status = classify(item, previous, current_hash, self._fp)
                statuses[status] += 1
                if status == "deleted":
                    continue
                source = previous if status == "reused" else None
                if source is None and classify(item, resumed, current_hash, self._fp) == "reused":
                    source = resumed  # a killed attempt of this run already embedded it, from the same content
                    statuses["resumed"] += 1
                if source is not None:
                    reused.append(EmbeddingRecord(
                        item_id=item.item_id, vector=source.vector, modalities=source.modalities,
                        content_hash=current_hash, model_fingerprint=self._fp, num_images=source.num_images,
                        attributes=item.attributes,  # attributes are today's: they are not part of the vector
                        transcript=source.transcript,
                        **display_fields(item.title, item.description, source.transcript)))
                    continue
                if self._mode == "metadata" and current_hash is not None:
                    # fuse would hash the fetched bytes; tomorrow compares metadata tokens, so carry ours
                    item = dataclasses.replace(item, content_hash=current_hash)
                encode.append(item)
        for status, n in statuses.items():
            self._counters[status].inc(n)
        yield beam.pvalue.TaggedOutput(STATUS, dict(statuses))
        if reused:
            progress.note(progress.REUSED, len(reused))
            yield beam.pvalue.TaggedOutput(REUSED, records_to_table(reused, self._schema))
        if encode:
            yield encode


class Incremental(beam.PTransform):
    """Keyed catalog items (``pipeline.read``) -> {encode: list[CatalogItem] batches, reused: pa.Table batches,
    status: {status: count} dicts, dead: duplicate-id DeadLetters}.

    The one join by item id of the graph: it carries catalog items (text and
    URIs) and, from the previous run, ids and content hashes (and, when the
    previous run is reusable, its vectors), never a modality vector. Without
    a previous run it only resolves duplicate ids. ``status`` counts every
    current item once (reused/new/changed) and every previous-only id (deleted).
    """

    def __init__(self, config: IncrementalConfig, previous: PreviousRun | None, model_fingerprint: str,
                 policy: FetchPolicy, media: frozenset[str] = frozenset({"image", "audio"}), *, schema,
                 batch_items: int = 256, resume: list[str] | None = None):
        super().__init__()
        self._config, self._previous, self._resume = config, previous, list(resume or [])
        self._fn = _Resolve(model_fingerprint, config.change_detection, policy,
                            hash_new=config.change_detection == "metadata", media=frozenset(media),
                            schema=schema, batch_items=batch_items)

    def expand(self, keyed_items):
        p = keyed_items.pipeline
        sides = [keyed_items]
        if self._previous is not None:
            files = previous_embedding_files(self._previous)
            sides.append(
                p
                | "PreviousFiles" >> beam.Create(files)
                | "SpreadFiles" >> beam.Reshuffle()
                | "ReadPrevious" >> beam.ParDo(_ReadPrevious(self._previous.reusable))
            )
        if self._resume:
            sides.append(
                p
                | "ResumePieces" >> beam.Create(self._resume)
                | "SpreadPieces" >> beam.Reshuffle()
                | "ReadResumed" >> beam.ParDo(_ReadResumed())
            )
        joined = (
            (sides[0] if len(sides) == 1 else tuple(sides) | "CurrentAndPrevious" >> beam.Flatten())
            | "JoinById" >> beam.GroupByKey()
        )
        out = joined | "Resolve" >> beam.ParDo(self._fn).with_outputs(REUSED, STATUS, DEAD, main=ENCODE)
        return {"encode": out[ENCODE], "reused": out[REUSED], "status": out[STATUS], "dead": out[DEAD]}


def incremental_counts(statuses: dict, encoded: int, embedded: int, previous: PreviousRun | None,
                       config: IncrementalConfig) -> dict:
    """The manifest's ``counts.incremental`` block; checks that reused + resumed + encoded == embedded.

    ``resumed``: items (counted among new/changed) whose vector a killed attempt
    of this run had already written; they were not encoded again.
    """
    block = {s: int(statuses.get(s, 0)) for s in STATUSES}
    block["resumed"] = int(statuses.get("resumed", 0))
    block["encoded"] = int(encoded)
    if block["reused"] + block["resumed"] + block["encoded"] != embedded:
        from pipeline.publish import AccountingError

        raise AccountingError(f"{block['reused']} reused + {block['resumed']} resumed + {encoded} encoded "
                              f"!= {embedded} embedded")
    block["previous_run"] = previous.to_json() if previous is not None else None
    block["change_detection"] = config.change_detection
    return block
