"""The catalog's files, inspected once at launch: names, column names and row counts from Parquet footers.

Reading footers is cheap (a few KB per file, no row data), and it lets the
command refuse a mistyped column or an unreadable file before any worker
starts, and size the progress bar. Plain functions, no Beam pipeline.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses

from pipeline.storage import parquet_file
from schemas.catalog import CatalogColumns, MissingColumn, resolve_columns


class CatalogFileError(ValueError):
    """The catalog path matches nothing, or a file in it is not a readable Parquet file."""


@dataclasses.dataclass(frozen=True)
class CatalogFiles:
    paths: tuple[str, ...]
    columns: dict[str, tuple[str, ...]]  # path -> its column names
    num_rows: int  # from the footers: the progress bar's total


def _footer(path: str) -> tuple[tuple[str, ...], int]:
    try:
        with parquet_file(path) as parquet:
            return tuple(parquet.schema_arrow.names), parquet.metadata.num_rows
    except Exception as e:  # noqa: BLE001 - pyarrow and the filesystems raise assorted errors
        raise CatalogFileError(f"{path} is not a readable Parquet file: {type(e).__name__}: {e}") from None


def inspect_catalog(pattern: str, threads: int = 16) -> CatalogFiles:
    """Matches ``pattern`` (path or glob, any Beam filesystem) and reads every file's footer."""
    from apache_beam.io.filesystems import FileSystems

    try:
        matched = FileSystems.match([pattern])[0].metadata_list
    except Exception as e:  # noqa: BLE001 - BeamIOError, or a scheme without a filesystem
        raise CatalogFileError(f"cannot list catalog {pattern!r}: {e}") from None
    paths = tuple(sorted(m.path for m in matched if m.size_in_bytes or not m.path.endswith("/")))
    if not paths:
        raise CatalogFileError(f"catalog {pattern!r} matches no file")
    with concurrent.futures.ThreadPoolExecutor(min(threads, len(paths))) as pool:
        footers = list(pool.map(_footer, paths))
    return CatalogFiles(paths, {p: cols for p, (cols, _) in zip(paths, footers)}, sum(n for _, n in footers))


def check_catalog(pattern: str, columns: CatalogColumns,
                  explicit: frozenset[str] = frozenset()) -> tuple[CatalogFiles, tuple[MissingColumn, ...]]:
    """:func:`inspect_catalog` + :func:`schemas.catalog.resolve_columns`: the files and the missing default columns."""
    files = inspect_catalog(pattern)
    return files, resolve_columns(files.columns, columns, explicit)
