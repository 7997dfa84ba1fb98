"""Stage 5: write batches of rows as sharded Parquet, each shard atomically.

A record's shard is a stable hash of its item id, rows inside a shard are
sorted by item id, and each file is written under a temporary name and then
renamed: a retried bundle rewrites the same file with the same content, and a
reader never sees half a shard.
"""
from __future__ import annotations

import hashlib
import math
import uuid
from typing import BinaryIO, Callable

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline import faults
from pipeline.stage_metrics import StageTimer
from schemas.dead_letter import DEAD_LETTER_SCHEMA, DeadLetter


def shard_of(item_id: str, num_shards: int) -> int:
    """Stable across processes and runs (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha1(item_id.encode()).digest()[:8], "big") % num_shards


def shard_name(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}-{shard:05d}-of-{num_shards:05d}.parquet"


def write_atomically(path: str, write: Callable[[BinaryIO], None], fault_point: str = "") -> None:
    """Writes ``path`` through ``write(stream)`` under a temporary name, then renames it.

    A reader never sees half a file, and a failed attempt leaves nothing
    behind: a retry writes its own temporary file.
    """
    directory, _, name = path.rpartition("/")
    tmp = f"{directory}/.tmp-{uuid.uuid4().hex}-{name}"
    try:
        with FileSystems.create(tmp) as stream:
            write(stream)
        if fault_point:
            faults.inject(fault_point)
        FileSystems.rename([tmp], [path])
    except BaseException:
        try:
            FileSystems.delete([tmp])
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
        raise


def write_table_atomically(path: str, table: pa.Table) -> None:
    write_atomically(path, lambda stream: pq.write_table(table, stream, compression="zstd"), "write_shard")


def write_bytes_atomically(path: str, data: bytes) -> None:
    write_atomically(path, lambda stream: stream.write(data))


def dead_letters_to_table(rows: list[DeadLetter], schema: pa.Schema = DEAD_LETTER_SCHEMA) -> pa.Table:
    return pa.Table.from_pylist([r.to_row() for r in rows], schema=schema)


def split_by_shard(table: pa.Table, num_shards: int) -> list[tuple[int, pa.Table]]:
    """A batch's rows grouped by their shard: [(shard, sub-table)], each shard once."""
    if table.num_rows == 0:
        return []
    shards = np.fromiter((shard_of(i, num_shards) for i in table.column("item_id").to_pylist()), np.int64,
                         count=table.num_rows)
    order = np.argsort(shards, kind="stable")
    ordered = shards[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(ordered)]
    return [(int(ordered[a]), table.take(pa.array(order[a:b]))) for a, b in zip(starts, ends)]


class _WriteShard(beam.DoFn):
    def __init__(self, directory: str, prefix: str, schema: pa.Schema):
        self._directory, self._prefix, self._schema = directory, prefix, schema

    def setup(self):
        self._timer = StageTimer("write")

    def process(self, element, num_shards: int):
        shard, tables = element
        tables = [t for t in tables if t.num_rows]
        path = f"{self._directory}/{shard_name(self._prefix, shard, num_shards)}"
        with self._timer.time(sum(t.num_rows for t in tables)):
            # sorted by item id: a retried bundle rewrites the same file with the same content
            table = (pa.concat_tables(tables) if tables else self._schema.empty_table()).sort_by("item_id")
            write_table_atomically(path, table.replace_schema_metadata(self._schema.metadata))
        yield path


class _WriteEmptyShards(beam.DoFn):
    """Writes the shards no record hashed to, so the set is always complete."""

    def __init__(self, directory: str, prefix: str, schema: pa.Schema):
        self._directory, self._prefix, self._schema = directory, prefix, schema

    def process(self, _, num_shards: int, written: list[str]):
        for shard in range(num_shards):
            path = f"{self._directory}/{shard_name(self._prefix, shard, num_shards)}"
            if path not in written:
                write_table_atomically(path, self._schema.empty_table())
            yield path


class WriteShards(beam.PTransform):
    """Batches of rows (``pa.Table`` in ``schema``) -> ``directory/prefix-SSSSS-of-NNNNN.parquet``; outputs the paths.

    The one shuffle of fused records: each batch is split by shard (a stable
    hash of the item id) and each shard's pieces meet in one worker, which
    sorts them by item id and writes the file atomically.
    """

    def __init__(self, directory: str, schema: pa.Schema, *, num_shards: int = 0,
                 rows_per_shard: int = 200_000, prefix: str = "part"):
        super().__init__()
        self._directory, self._schema = directory.rstrip("/"), schema
        self._num_shards, self._rows_per_shard, self._prefix = num_shards, rows_per_shard, prefix

    def expand(self, tables):
        fixed, per_shard = self._num_shards, self._rows_per_shard
        num_shards = (
            tables
            | "Rows" >> beam.Map(lambda t: t.num_rows)
            | "Count" >> beam.CombineGlobally(sum)
            | "NumShards" >> beam.Map(lambda n: fixed or max(1, math.ceil(n / per_shard)))
        )
        shards = beam.pvalue.AsSingleton(num_shards)
        written = (
            tables
            | "SplitByShard" >> beam.FlatMap(split_by_shard, shards)
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(_WriteShard(self._directory, self._prefix, self._schema), shards)
        )
        return (
            tables.pipeline
            | "Once" >> beam.Create([None])
            | "CompleteShards" >> beam.ParDo(_WriteEmptyShards(self._directory, self._prefix, self._schema),
                                             shards, beam.pvalue.AsList(written))
        )
