"""Stage 1: read the catalog Parquet files a row group at a time and validate the rows.

Outputs, per row group, its valid items split by join bucket
(:func:`pipeline.stages.records.bucket_of`): one ``(bucket, ("c", [item tuple, ...]))``
element per bucket present in the row group, keyed for the one join by item id
(``pipeline/stages/incremental.py``), which also resolves duplicate ids. No Beam
element is one item: the join's input is a few elements per row group. Rows
that fail validation become dead letters (``dead``); rows whose content
is only in modalities the run has no model for as counted skips (``skipped``);
and the number of rows read per row group (``rows``). Files are read row group
by row group, so memory does not grow with the catalog.
"""
from __future__ import annotations

import posixpath
import time
import typing

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.metrics import Metrics

from pipeline.stages import progress
from pipeline.config import ReadConfig
from pipeline.stages.records import bucket_of, item_to_tuple
from pipeline.stages.stage_metrics import StageTimer
from schemas.catalog import (MAX_ITEM_ID_CHARS, MAX_MEDIA_PER_ITEM, CatalogColumns, CatalogItem, InvalidRow,
                             validate_row)
from schemas.dead_letter import DeadLetter, Reason, Skip, SkipReason, Stage

DEAD, SKIPPED, ROWS = "dead", "skipped", "rows"
CURRENT = "c"  # tag of a batch of catalog items in the join by item id (the previous run's rows are "p")
MAX_JOIN_BATCH = 4096  # items per element of the join's input, at most (a row group holds up to 16k)
NAMESPACE = "catalog_index.read"


class CatalogFileError(ValueError):
    """A catalog file that cannot be read as a catalog at all (not one bad row)."""


def _wanted_columns(columns: CatalogColumns) -> list[str]:
    return [columns.item_id, columns.title, columns.description, columns.image_uris, columns.audio_uri,
            *columns.passthrough]


def classify_row(row: dict, config: ReadConfig, modalities: frozenset[str], base_uri: str,
                 source: str) -> CatalogItem | DeadLetter | Skip:
    """One raw row -> the item, or the dead letter / counted skip it becomes (plain logic)."""
    try:
        item = validate_row(row, config.columns, base_uri=base_uri, source=source,
                            max_text_chars=config.max_text_chars)
    except InvalidRow as e:
        item_id = e.item_id if e.item_id is not None else f"<row {source}>"
        return DeadLetter(item_id, Stage.VALIDATE, Reason.INVALID_ROW, str(e), source)
    if not item.has_content:
        return DeadLetter(item.item_id, Stage.VALIDATE, Reason.EMPTY_ITEM, "no text, image or audio", source)
    if not item.modalities & modalities:
        return Skip(item.item_id, SkipReason.NO_CONFIGURED_MODALITY,
                    f"has {'+'.join(sorted(item.modalities))}; this run embeds {'+'.join(sorted(modalities))}")
    return item


_STRING_TYPES = (pa.string(), pa.large_string())


def _fast_path_columns(table: pa.Table, columns: CatalogColumns) -> bool:
    """True if the row group's columns have the types :func:`classify_rows` reads without row dicts."""
    if columns.passthrough or table.schema.field(columns.item_id).type not in _STRING_TYPES:
        return False
    for name in (columns.title, columns.description, columns.audio_uri):
        if name in table.column_names and table.schema.field(name).type not in _STRING_TYPES:
            return False
    if columns.image_uris in table.column_names:
        kind = table.schema.field(columns.image_uris).type
        if not (kind in _STRING_TYPES or (pa.types.is_list(kind) or pa.types.is_large_list(kind))
                and kind.value_type in _STRING_TYPES):
            return False
    return True


def classify_rows(table: pa.Table, config: ReadConfig, modalities: frozenset[str], base_uri: str, path: str,
                  first_row: int) -> list[tuple | DeadLetter | Skip]:
    """A row group -> per row, the item (as :func:`item_to_tuple`), dead letter or skip of :func:`classify_row`.

    Reads the columns as Python lists, one per column, and validates plain rows inline; a row that is not
    plain (a missing or too long id, too many URIs, no content the run embeds) and any row group whose
    column types are not the catalog's (integer ids, passthrough columns) go through :func:`classify_row`,
    so every outcome, dead letters and their details included, is the one it gives
    (``tests/test_hot_path.py`` compares the two on edge cases).
    """
    columns, n = config.columns, table.num_rows
    rows: list[dict] = []  # the row group as row dicts, made once if any row needs them

    def slow(k: int):
        if not rows:
            rows.extend(table.to_pylist())
        out = classify_row(rows[k], config, modalities, base_uri, f"{path}#{first_row + k}")
        return item_to_tuple(out) if isinstance(out, CatalogItem) else out

    if not _fast_path_columns(table, columns):
        return [slow(k) for k in range(n)]

    def column(name: str) -> list:
        return table.column(name).to_pylist() if name in table.column_names else [None] * n

    ids, titles, descriptions = column(columns.item_id), column(columns.title), column(columns.description)
    images, audios, limit = column(columns.image_uris), column(columns.audio_uri), config.max_text_chars
    text_ok, image_ok, audio_ok = "text" in modalities, "image" in modalities, "audio" in modalities
    out: list = []
    for k in range(n):
        raw = ids[k]
        item_id = raw.strip() if raw is not None else ""
        uris = images[k]
        if not item_id or len(item_id) > MAX_ITEM_ID_CHARS or (isinstance(uris, list) and len(uris) > MAX_MEDIA_PER_ITEM):
            out.append(slow(k))
            continue
        title, description, audio = titles[k], descriptions[k], audios[k]
        if title is not None:
            title = title.strip()
            title = title[:limit] if title else None
        if description is not None:
            description = description.strip()
            description = description[:limit] if description else None
        if uris is None:
            uris = ()
        else:
            if isinstance(uris, str):
                uris = [uris]
            uris = tuple(u for u in (u.strip() for u in uris if u is not None) if u)
        audio = (audio.strip() or None) if audio else None
        if not (((title or description) and text_ok) or (uris and image_ok) or (audio and audio_ok)):
            out.append(slow(k))  # an empty item (dead letter) or one the run has no model for (skip)
            continue
        out.append((item_id, title, description, uris, audio, base_uri, f"{path}#{first_row + k}", None, None))
    return out


class _ReadRows(beam.DoFn):
    """A matched Parquet file -> bucketed batches of valid items, dead letters, skips, row counts; a row group
    at a time."""

    def __init__(self, config: ReadConfig, modalities: frozenset[str], progress_interval_s: float,
                 num_buckets: int = 1):
        self._config, self._modalities, self._interval = config, modalities, progress_interval_s
        self._num_buckets = num_buckets

    def setup(self):
        self._rows = Metrics.counter(NAMESPACE, "rows")
        self._invalid = Metrics.counter(NAMESPACE, "invalid_rows")
        self._skipped = Metrics.counter(NAMESPACE, "skipped")
        self._timer = StageTimer("read")
        progress.start(self._interval)

    def process(self, readable: fileio.ReadableFile):
        path = readable.metadata.path
        base_uri = posixpath.dirname(path) if "://" not in path else path.rsplit("/", 1)[0]
        try:
            parquet = pq.ParquetFile(readable.open())
        except Exception as e:  # noqa: BLE001 - pyarrow's errors for non-Parquet input vary
            raise CatalogFileError(f"{path} is not a readable Parquet file: {e}") from e
        present = set(parquet.schema_arrow.names)
        if self._config.columns.item_id not in present:
            raise CatalogFileError(
                f"{path} has no item id column {self._config.columns.item_id!r} "
                f"(columns: {sorted(present)}); set --item_id_column"
            )
        wanted = [c for c in dict.fromkeys(_wanted_columns(self._config.columns)) if c in present]
        row_number = 0
        for group in range(parquet.num_row_groups):
            started, cpu = time.perf_counter(), time.process_time()
            table = parquet.read_row_group(group, columns=wanted)
            results = classify_rows(table, self._config, self._modalities, base_uri, path, row_number)
            row_number += table.num_rows
            out, buckets = [], {}
            for result in results:
                if isinstance(result, tuple):
                    buckets.setdefault(bucket_of(result[0], self._num_buckets), []).append(result)
                elif isinstance(result, Skip):
                    self._skipped.inc()
                    out.append(beam.pvalue.TaggedOutput(SKIPPED, result))
                else:
                    self._invalid.inc()
                    out.append(beam.pvalue.TaggedOutput(DEAD, result))
            self._rows.inc(table.num_rows)
            self._timer.record(time.perf_counter() - started, time.process_time() - cpu, table.num_rows)
            progress.note("read", table.num_rows)
            progress.note(progress.REJECTED, len(out))
            yield beam.pvalue.TaggedOutput(ROWS, table.num_rows)
            yield from out
            for bucket in sorted(buckets):
                items = buckets[bucket]
                for start in range(0, len(items), MAX_JOIN_BATCH):
                    yield bucket, (CURRENT, items[start:start + MAX_JOIN_BATCH])


class ReadOutputs(typing.NamedTuple):
    """What the read stage hands on (each a PCollection)."""

    items: beam.PCollection  # (bucket, ("c", [item tuple, ...])): a row group's valid items per join bucket
    dead: beam.PCollection  # DeadLetter: rows that failed validation
    skipped: beam.PCollection  # Skip: rows with content only in modalities the run has no model for
    rows: beam.PCollection  # int: rows read, one per row group


class ReadCatalog(beam.PTransform):
    """pipeline root -> :class:`ReadOutputs`.

    ``modalities`` are those the run has models for; an item whose content is
    only in other modalities is a counted skip, not a dead letter. Duplicate
    ids are resolved at the join by item id (``pipeline/stages/incremental.py``);
    ``num_buckets`` is that join's (:func:`pipeline.stages.records.join_buckets`).
    """

    def __init__(self, config: ReadConfig, progress_interval_s: float = 0.0,
                 modalities: frozenset[str] = frozenset({"text", "image", "audio"}), num_buckets: int = 1):
        super().__init__()
        self._config, self._interval, self._modalities = config, progress_interval_s, frozenset(modalities)
        self._num_buckets = num_buckets

    def expand(self, pbegin) -> ReadOutputs:
        out = (
            pbegin
            | "MatchCatalog" >> fileio.MatchFiles(self._config.catalog, empty_match_treatment=fileio.EmptyMatchTreatment.DISALLOW)
            | "OpenFiles" >> fileio.ReadMatches()
            | "ReadRows" >> beam.ParDo(_ReadRows(self._config, self._modalities, self._interval, self._num_buckets))
            .with_outputs(DEAD, SKIPPED, ROWS, main="items")
        )
        return ReadOutputs(items=out.items, dead=out[DEAD], skipped=out[SKIPPED], rows=out[ROWS])
