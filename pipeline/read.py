"""Stage 1: read the catalog Parquet files, validate rows, resolve duplicate item ids.

Outputs the valid, unique :class:`CatalogItem`s (main) and dead letters
(``dead``). Files are read row group by row group, so memory does not grow
with the catalog.
"""
from __future__ import annotations

import posixpath

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.metrics import Metrics

from pipeline import progress
from pipeline.stage_metrics import StageTimer
from pipeline.config import ReadConfig
from schemas.catalog import CatalogColumns, CatalogItem, InvalidRow, validate_row
from schemas.dead_letter import DeadLetter, Reason, Skip, SkipReason, Stage

DEAD, SKIPPED = "dead", "skipped"
NAMESPACE = "catalog_index.read"


class CatalogFileError(ValueError):
    """A catalog file that cannot be read as a catalog at all (not one bad row)."""


def _wanted_columns(columns: CatalogColumns) -> list[str]:
    return [columns.item_id, columns.title, columns.description, columns.image_uris, columns.audio_uri,
            *columns.passthrough]


class _ReadRows(beam.DoFn):
    """A matched Parquet file -> (source, base_uri, raw row dict), one row group at a time."""

    def __init__(self, config: ReadConfig, progress_interval_s: float):
        self._config, self._interval = config, progress_interval_s
        self._rows = Metrics.counter(NAMESPACE, "rows")
        self._timer = StageTimer("read")

    def setup(self):
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
            with self._timer.batch(parquet.metadata.row_group(group).num_rows):
                rows = parquet.read_row_group(group, columns=wanted).to_pylist()
            for row in rows:
                self._rows.inc()
                progress.note("read")
                yield f"{path}#{row_number}", base_uri, row
                row_number += 1


class _Validate(beam.DoFn):
    def __init__(self, config: ReadConfig, modalities: frozenset[str]):
        self._config, self._modalities = config, modalities
        self._invalid = Metrics.counter(NAMESPACE, "invalid_rows")
        self._skipped = Metrics.counter(NAMESPACE, "skipped")

    def process(self, element):
        source, base_uri, row = element
        try:
            item = validate_row(row, self._config.columns, base_uri=base_uri, source=source,
                                max_text_chars=self._config.max_text_chars)
        except InvalidRow as e:
            self._invalid.inc()
            item_id = e.item_id if e.item_id is not None else f"<row {source}>"
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter(item_id, Stage.VALIDATE, Reason.INVALID_ROW, str(e), source))
            return
        if not item.has_content:
            yield beam.pvalue.TaggedOutput(
                DEAD, DeadLetter(item.item_id, Stage.VALIDATE, Reason.EMPTY_ITEM, "no text, image or audio", source))
            return
        if not item.modalities & self._modalities:
            self._skipped.inc()
            yield beam.pvalue.TaggedOutput(SKIPPED, Skip(
                item.item_id, SkipReason.NO_CONFIGURED_MODALITY,
                f"has {'+'.join(sorted(item.modalities))}; this run embeds {'+'.join(sorted(self._modalities))}"))
            return
        yield item.item_id, item


def _source_order(item: CatalogItem) -> tuple[str, int]:
    path, _, row = item.source.rpartition("#")
    return path, int(row) if row.isdigit() else 0


class _KeepFirst(beam.DoFn):
    """Of several rows with one item id, keeps the first by (file, row); the rest are dead letters."""

    def __init__(self):
        self._duplicates = Metrics.counter(NAMESPACE, "duplicate_ids")

    def process(self, element):
        item_id, items = element
        ordered = sorted(items, key=_source_order)
        yield ordered[0]
        for dup in ordered[1:]:
            self._duplicates.inc()
            yield beam.pvalue.TaggedOutput(
                DEAD,
                DeadLetter(item_id, Stage.VALIDATE, Reason.DUPLICATE_ID,
                           f"item id also at {ordered[0].source}; first occurrence kept", dup.source),
            )


class ReadCatalog(beam.PTransform):
    """pipeline root -> {items: CatalogItem, dead: DeadLetter, skipped: Skip, rows: raw rows (for counting)}.

    ``modalities`` are those the run has models for; an item whose content is
    only in other modalities is a counted skip, not a dead letter.
    """

    def __init__(self, config: ReadConfig, progress_interval_s: float = 0.0,
                 modalities: frozenset[str] = frozenset({"text", "image", "audio"})):
        super().__init__()
        self._config, self._interval, self._modalities = config, progress_interval_s, frozenset(modalities)

    def expand(self, pbegin):
        rows = (
            pbegin
            | "MatchCatalog" >> fileio.MatchFiles(self._config.catalog, empty_match_treatment=fileio.EmptyMatchTreatment.DISALLOW)
            | "OpenFiles" >> fileio.ReadMatches()
            | "ReadRows" >> beam.ParDo(_ReadRows(self._config, self._interval))
        )
        validated = rows | "Validate" >> (
            beam.ParDo(_Validate(self._config, self._modalities))
            .with_output_types(tuple[str, CatalogItem]).with_outputs(DEAD, SKIPPED, main="items"))
        unique = (
            validated.items
            | "GroupById" >> beam.GroupByKey()
            | "KeepFirst" >> beam.ParDo(_KeepFirst()).with_outputs(DEAD, main="items")
        )
        dead = (validated[DEAD], unique[DEAD]) | "FlattenDead" >> beam.Flatten()
        return {"items": unique.items, "dead": dead, "skipped": validated[SKIPPED], "rows": rows}
