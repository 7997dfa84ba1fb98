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
import logging
import typing

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from encoders.digest import sha256_hex
from encoders.media import FetchPolicy, MediaError, fetch_bytes, resolve_uri
from pipeline.config import CHANGE_DETECTION, LATEST, NONE, IncrementalConfig
from pipeline.report import sample as report_sample
from pipeline.stages import progress
from pipeline.stages.fuse import content_hash
from pipeline.stages.publish import AccountingError
from pipeline.stages.records import MediaDigest, bucket_of, item_from_tuple
from pipeline.stages.stage_metrics import StageTimer
from pipeline.stages.write import PIECES
from pipeline.storage import MANIFEST, latest_run_dir, parquet_file, read_manifest
from schemas.catalog import CatalogItem
from schemas.dead_letter import DeadLetter, Reason, Stage
from schemas.embeddings import display_fields
from schemas.manifest import Manifest

NAMESPACE = "catalog_index.incremental"
ENCODE, STATUS = "encode", "status"
STATUSES = ("reused", "new", "changed", "deleted")
_LOG = logging.getLogger(__name__)


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

    @property
    def reusable(self) -> bool:
        return self.vector is not None


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
    return sha256_hex(fetch_bytes(uri, policy))


def item_content_hash(item: CatalogItem, tokens: list[str], model_fingerprint: str,
                      audio_token: str | None = None) -> str:
    """The item's content hash from one change token per image (in ``image_uris`` order) and its audio's.

    With ``bytes`` tokens this is exactly what the fuse stage writes for an
    encoded item whose media all decoded, which is what makes reuse possible.
    """

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


def classify(item: CatalogItem | None, previous: PreviousVector | PreviousHash | None, current_hash: str | None,
             model_fingerprint: str) -> str:
    """One of 'reused', 'new', 'changed', 'deleted' for an item id seen in either run."""
    if item is None:
        return "deleted"
    if previous is None:
        return "new"
    if (previous.reusable and current_hash is not None and previous.content_hash == current_hash
            and previous.model_fingerprint == model_fingerprint):
        return "reused"
    return "changed"


def resolve_previous_run(output: str, previous_run: str, run_dir: str, metadata: dict,
                         vector_dtype: str) -> PreviousRun | None:
    """The published run to compare with, or None (first run, or ``none``).

    Only a published run (one with a manifest) is used; a named directory
    without one is an error, since reusing half a run would be wrong.
    """

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


def previous_embedding_files(previous: PreviousRun) -> list[str]:
    """The embeddings shards the previous run's manifest lists (exactly what was published)."""

    return [f"{previous.run_dir}/{path}" for path in read_manifest(previous.run_dir).file_paths("embeddings/")]


HASH_COLUMNS = ["item_id", "content_hash", "model_fingerprint"]  # what the join needs of a previous row


def read_hashes(path: str):
    """Ids, content hashes and model fingerprints of one embeddings shard (Parquet) or a killed attempt's
    piece (Arrow IPC), as ``pa.Table`` chunks (a row group at a time): no vector is read."""
    if path.endswith(".arrow"):
        from pipeline.stages.write import _open_piece

        yield _open_piece(path).select(HASH_COLUMNS)
        return
    with parquet_file(path) as parquet:
        for group in range(parquet.num_row_groups):
            yield parquet.read_row_group(group, columns=HASH_COLUMNS)


@dataclasses.dataclass(frozen=True)
class ReuseRequest:
    """An item whose vector is taken from the previous run's (or the killed attempt's) ``file``: what of
    today's row comes from the current item. Keyed by the file in the second, ids-only shuffle."""

    item_id: str
    content_hash: str  # the current hash (equal to the stored one: that is why it is reused)
    attributes: str | None
    title: str | None
    description: str | None


def read_reused_rows(path: str, requests: dict[str, tuple], schema, model_fingerprint: str):
    """The rows of ``path`` whose ids are in ``requests`` (item id -> ReuseRequest tuple), as ``pa.Table``
    chunks in ``schema``: vector, modalities, images and transcript from the file; hash, attributes and
    display fields from today's item. Raises if an id is not in the file (a reused item must not vanish)."""
    import pyarrow as pa
    import pyarrow.compute as pc


    wanted = pa.array(sorted(requests), pa.string())
    found = 0
    for table in _matching_rows(path, wanted):
        ids = table.column("item_id").to_pylist()
        asked = [requests[i] for i in ids]
        transcripts = table.column("transcript").to_pylist()
        shown = [display_fields(r[3], r[4], t) for r, t in zip(asked, transcripts)]
        found += len(ids)
        yield pa.Table.from_pydict({
            "item_id": table.column("item_id"),
            "vector": table.column("vector").cast(schema.field("vector").type),
            "modalities": table.column("modalities"),
            "content_hash": pa.array([r[1] for r in asked], pa.string()),
            "model_fingerprint": pa.array([model_fingerprint] * len(ids), pa.string()),
            "num_images": pc.cast(table.column("num_images"), pa.int32()),
            "attributes": pa.array([r[2] for r in asked], pa.string()),
            "transcript": table.column("transcript"),
            "title": pa.array([d["title"] for d in shown], pa.string()),
            "snippet": pa.array([d["snippet"] for d in shown], pa.string()),
        }, schema=schema)
    if found != len(requests):
        raise RuntimeError(f"{len(requests) - found} of {len(requests)} items to reuse are not in {path} "
                           "(the file changed after the join read it?)")


_REUSED_COLUMNS = ["item_id", "vector", "modalities", "num_images", "transcript"]


def _matching_rows(path: str, wanted):
    import pyarrow.compute as pc

    if path.endswith(".arrow"):
        from pipeline.stages.write import _open_piece

        table = _open_piece(path).select(_REUSED_COLUMNS)
        mask = pc.is_in(table.column("item_id"), value_set=wanted)
        yield table.filter(mask)
        return
    with parquet_file(path) as parquet:
        for group in range(parquet.num_row_groups):
            # the ids first: a row group none of whose items is reused costs no vector read
            mask = pc.is_in(parquet.read_row_group(group, columns=["item_id"]).column("item_id"), value_set=wanted)
            if pc.any(mask).as_py():
                yield parquet.read_row_group(group, columns=_REUSED_COLUMNS).filter(mask)


# --------------------------------------------------------------------------- Beam wrappers


PREVIOUS = "p"  # tag of a batch of previous-run ids and hashes in the join (catalog items are "c", pipeline.stages.read)
RESUMED = "r"  # tag of a batch of ids and hashes a killed attempt of this run already wrote
DEAD, REUSE, SAMPLE = "dead", "reuse", "sample"


def _source_order(item: CatalogItem) -> tuple[str, int]:
    path, _, row = item.source.rpartition("#")
    return path, int(row) if row.isdigit() else 0


def resolve_duplicates(item_id: str, items: list[CatalogItem]) -> tuple[CatalogItem, list[DeadLetter]]:
    """Of several rows with one item id, the first by (file, row) is kept; the rest are dead letters."""
    ordered = sorted(items, key=_source_order)
    return ordered[0], [DeadLetter(item_id, Stage.VALIDATE, Reason.DUPLICATE_ID,
                                   f"item id also at {ordered[0].source}; first occurrence kept", dup.source)
                        for dup in ordered[1:]]


@dataclasses.dataclass(frozen=True)
class PreviousHash:
    """What the join carries of a previous (or a killed attempt's) row: no vector, only where it lies."""

    content_hash: str
    model_fingerprint: str
    reusable: bool  # False: the previous run's vectors cannot stand in for this run's (ids read only to count)
    file: str  # the shard (or piece) that holds the row's vector


class _ReadHashes(beam.DoFn):
    """A previous run's shard or a killed attempt's piece -> ``(bucket, (tag, (path, reusable, ids, hashes,
    fingerprints)))`` per bucket present in each row group: lists of strings, no vector."""

    def __init__(self, tag: str, reusable: bool, num_buckets: int):
        self._tag, self._reusable, self._num_buckets = tag, reusable, num_buckets
        self._rows = Metrics.counter(NAMESPACE, "previous_rows" if tag == PREVIOUS else "resume_rows")

    def process(self, path: str):
        for table in read_hashes(path):
            ids = table.column("item_id").to_pylist()
            hashes = table.column("content_hash").to_pylist()
            fps = table.column("model_fingerprint").to_pylist()
            self._rows.inc(len(ids))
            by_bucket: dict[int, list[int]] = {}
            for row, item_id in enumerate(ids):
                by_bucket.setdefault(bucket_of(item_id, self._num_buckets), []).append(row)
            for bucket in sorted(by_bucket):
                rows = by_bucket[bucket]
                yield bucket, (self._tag, (path, self._reusable, [ids[r] for r in rows], [hashes[r] for r in rows],
                                           [fps[r] for r in rows]))


class _Resolve(beam.DoFn):
    """Joined buckets (bucket -> batches of catalog rows, previous ids + hashes) -> batches to encode,
    requests to reuse, statuses, the report's sample.

    Per bucket: its ids sorted (so no output depends on bundles or on the
    order the shuffle delivers), duplicates resolved (first by file and row),
    then, ``batch_items`` ids at a time, each item classified reused / new /
    changed (deleted for ids only in the previous run). Hashing reads media
    (bytes mode) or stats it (metadata mode): a thread pool overlaps the I/O.
    Outputs: main, ``list[CatalogItem]`` batches to encode; ``reuse``,
    ``(file, [ReuseRequest tuple, ...])`` per batch and file holding reused
    vectors; ``status``, a {status: count} dict per batch; ``dead``,
    duplicate-id dead letters; ``sample``, the bucket's candidates for the
    report's sample (a list of report_sample.SampleItem: those that can still
    be among the smallest keys this worker has seen).
    """

    def __init__(self, model_fingerprint: str, mode: str, policy: FetchPolicy, hash_new: bool,
                 media: frozenset[str], batch_items: int, threads: int = 8):
        self._fp, self._mode, self._policy, self._hash_new, self._threads = (
            model_fingerprint, mode, policy, hash_new, threads)
        self._media, self._batch_items = media, batch_items
        self._pool = None

    def setup(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="hash")
        self._counters = {s: Metrics.counter(NAMESPACE, s) for s in (*STATUSES, "resumed")}
        self._duplicates = Metrics.counter("catalog_index.read", "duplicate_ids")
        self._timer = StageTimer("incremental")
        self._sample_bound = report_sample.LocalBound()

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def process(self, element):
        from pipeline.stages.read import CURRENT

        _, values = element
        current: dict[str, list[tuple]] = {}
        previous: dict[str, PreviousHash] = {}
        resumed: dict[str, PreviousHash] = {}
        for tag, value in values:
            if tag == CURRENT:
                for t in value:
                    current.setdefault(t[0], []).append(t)
                continue
            path, reusable, ids, hashes, fps = value
            for item_id, h, fp in zip(ids, hashes, fps):
                if tag == PREVIOUS:
                    if item_id in previous:
                        raise RuntimeError(f"item id {item_id!r} appears more than once in the previous run; "
                                           "ids must be unique")
                    previous[item_id] = PreviousHash(h, fp, reusable, path)
                elif item_id not in resumed or path < resumed[item_id].file:
                    # a killed attempt may have written an item twice (a retried bundle): the rows are equal;
                    # the first piece by name is taken, so the choice does not depend on delivery order
                    resumed[item_id] = PreviousHash(h, fp, reusable, path)
        entries, kept = [], []
        for item_id in sorted(current.keys() | previous.keys()):
            rows = current.get(item_id)
            item = None
            if rows:
                if len(rows) == 1:
                    item = item_from_tuple(rows[0])
                else:
                    item, duplicates = resolve_duplicates(item_id, [item_from_tuple(t) for t in rows])
                    for dead in duplicates:
                        self._duplicates.inc()
                        progress.note(progress.REJECTED)
                        yield beam.pvalue.TaggedOutput(DEAD, dead)
                kept.append(item)
            entries.append((item, previous.get(item_id), resumed.get(item_id) if item is not None else None))
        for start in range(0, len(entries), self._batch_items):
            yield from self._classify(entries[start:start + self._batch_items])
        # the report's sample candidates: only items that can still be among the smallest keys this worker saw
        sampled = [report_sample.sample_item(item) for item in kept if self._sample_bound.offer(item.item_id)]
        if sampled:
            yield beam.pvalue.TaggedOutput(SAMPLE, sampled)

    def _needs_hash(self, item, previous, resumed=None) -> bool:
        # A new item is encoded whatever its hash; it is only hashed here when the
        # fuse stage cannot derive the same hash itself (metadata tokens).
        return item is not None and ((previous is not None and previous.reusable) or self._hash_new
                                     or resumed is not None)

    def _hash(self, entry):
        item, previous, resumed = entry
        if not self._needs_hash(item, previous, resumed):
            return None
        return hash_item(item, self._fp, self._mode, self._policy, self._media)

    def _classify(self, entries):
        with self._timer.batch(len(entries)):
            if any(self._needs_hash(*entry) for entry in entries):
                hashes = list(self._pool.map(self._hash, entries))
            else:
                hashes = [None] * len(entries)
            statuses: collections.Counter = collections.Counter()
            reuse: dict[str, list[tuple]] = {}
            encode = []
            for (item, previous, resumed), current_hash in zip(entries, hashes):
                status = classify(item, previous, current_hash, self._fp)
                statuses[status] += 1
                if status == "deleted":
                    continue
                source = previous if status == "reused" else None
                if source is None and classify(item, resumed, current_hash, self._fp) == "reused":
                    source = resumed  # a killed attempt of this run already embedded it, from the same content
                    statuses["resumed"] += 1
                if source is not None:
                    # attributes are today's: they are not part of the vector; the vector stays where it lies
                    reuse.setdefault(source.file, []).append(dataclasses.astuple(ReuseRequest(
                        item.item_id, current_hash, item.attributes, item.title, item.description)))
                    continue
                if self._mode == "metadata" and current_hash is not None:
                    # fuse would hash the fetched bytes; tomorrow compares metadata tokens, so carry ours
                    item = dataclasses.replace(item, content_hash=current_hash)
                encode.append(item)
        for status, n in statuses.items():
            self._counters[status].inc(n)
        yield beam.pvalue.TaggedOutput(STATUS, dict(statuses))
        for path in sorted(reuse):
            yield beam.pvalue.TaggedOutput(REUSE, (path, reuse[path]))
        if encode:
            yield encode


class _ReadReused(beam.DoFn):
    """``(file, [[ReuseRequest tuple, ...], ...])`` -> the reused rows (``pa.Table`` in the embeddings schema),
    read from the file where they lie, a row group at a time."""

    def __init__(self, schema, model_fingerprint: str):
        self._schema, self._fp = schema, model_fingerprint

    def setup(self):
        self._timer = StageTimer("reuse")

    def process(self, element):
        path, batches = element
        requests = {r[0]: r for batch in batches for r in batch}
        with self._timer.batch(len(requests)):
            tables = list(read_reused_rows(path, requests, self._schema, self._fp))
        for table in tables:
            if table.num_rows:
                progress.note(progress.REUSED, table.num_rows)
                yield table


class IncrementalOutputs(typing.NamedTuple):
    """What the join by id bucket hands on (each a PCollection)."""

    encode: beam.PCollection  # list[CatalogItem]: batches of new and changed items, to embed
    reused: beam.PCollection  # pa.Table: reused rows, read from the shard (or piece) that holds them
    status: beam.PCollection  # {status: count} per batch: reused / new / changed / deleted (+ resumed)
    dead: beam.PCollection  # DeadLetter: duplicate ids
    sample: beam.PCollection  # list[SampleItem]: the report's sample candidates, per bucket


class Incremental(beam.PTransform):
    """Bucketed catalog items (``ReadOutputs.items``) -> :class:`IncrementalOutputs`.

    The one join by item id of the graph (``JoinByIdBucket``, one element per
    bucket and row group on each side): it carries catalog items (text and
    URIs) and, from the previous run and a killed attempt's pieces, ids and
    content hashes, never a vector. Reused vectors are then read where they
    lie: ``ReuseByFile`` brings each file the ids to take from it (ids and
    today's attributes and display text, no vector). Without a previous run or
    pieces it only resolves duplicate ids. ``status`` counts every current item
    once (reused/new/changed) and every previous-only id (deleted).
    """

    def __init__(self, config: IncrementalConfig, previous: PreviousRun | None, model_fingerprint: str,
                 policy: FetchPolicy, media: frozenset[str] = frozenset({"image", "audio"}), *, schema,
                 batch_items: int = 256, resume: list[str] | None = None, num_buckets: int = 1):
        super().__init__()
        self._config, self._previous, self._resume = config, previous, list(resume or [])
        self._num_buckets, self._schema, self._fp = num_buckets, schema, model_fingerprint
        self._fn = _Resolve(model_fingerprint, config.change_detection, policy,
                            hash_new=config.change_detection == "metadata", media=frozenset(media),
                            batch_items=batch_items)

    def expand(self, bucketed_items) -> IncrementalOutputs:
        p = bucketed_items.pipeline
        sides = [bucketed_items]
        if self._previous is not None:
            sides.append(
                p
                | "PreviousFiles" >> beam.Create(previous_embedding_files(self._previous))
                | "SpreadFiles" >> beam.Reshuffle()
                | "ReadPrevious" >> beam.ParDo(_ReadHashes(PREVIOUS, self._previous.reusable, self._num_buckets))
            )
        if self._resume:
            sides.append(
                p
                | "ResumePieces" >> beam.Create(self._resume)
                | "SpreadPieces" >> beam.Reshuffle()
                | "ReadResumed" >> beam.ParDo(_ReadHashes(RESUMED, True, self._num_buckets))
            )
        joined = (
            (sides[0] if len(sides) == 1 else tuple(sides) | "CurrentAndPrevious" >> beam.Flatten())
            | "JoinByIdBucket" >> beam.GroupByKey()
        )
        out = joined | "Resolve" >> beam.ParDo(self._fn).with_outputs(REUSE, STATUS, DEAD, SAMPLE, main=ENCODE)
        if self._previous is not None and self._previous.reusable or self._resume:
            reused = (
                out[REUSE]
                | "ReuseByFile" >> beam.GroupByKey()
                | "ReadReused" >> beam.ParDo(_ReadReused(self._schema, self._fp))
            )
        else:  # nothing can be reused: no second shuffle
            reused = p | "NoReuse" >> beam.Create([])
        return IncrementalOutputs(encode=out[ENCODE], reused=reused, status=out[STATUS], dead=out[DEAD],
                                  sample=out[SAMPLE])


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

        raise AccountingError(f"{block['reused']} reused + {block['resumed']} resumed + {encoded} encoded "
                              f"!= {embedded} embedded")
    block["previous_run"] = previous.to_json() if previous is not None else None
    block["change_detection"] = config.change_detection
    return block
