"""Stage 5: write records as sharded Parquet, each shard atomically.

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
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline import faults
from pipeline.stage_metrics import StageTimer
from schemas.dead_letter import DEAD_LETTER_SCHEMA, DeadLetter
from schemas.embeddings import EmbeddingRecord, records_to_table


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


def embeddings_to_table(records: list[EmbeddingRecord], schema: pa.Schema) -> pa.Table:
    return records_to_table(records, schema)


def dead_letters_to_table(rows: list[DeadLetter], schema: pa.Schema = DEAD_LETTER_SCHEMA) -> pa.Table:
    return pa.Table.from_pylist([r.to_row() for r in rows], schema=schema)


class _WriteShard(beam.DoFn):
    def __init__(self, directory: str, prefix: str, to_table: Callable, schema: pa.Schema):
        self._directory, self._prefix, self._to_table, self._schema = directory, prefix, to_table, schema
        self._timer = StageTimer("write")

    def process(self, element, num_shards: int):
        shard, records = element
        records = sorted(records, key=lambda r: r.item_id)
        path = f"{self._directory}/{shard_name(self._prefix, shard, num_shards)}"
        with self._timer.batch(len(records)):
            write_table_atomically(path, self._to_table(records, self._schema))
        yield path


class _WriteEmptyShards(beam.DoFn):
    """Writes the shards no record hashed to, so the set is always complete."""

    def __init__(self, directory: str, prefix: str, to_table: Callable, schema: pa.Schema):
        self._directory, self._prefix, self._to_table, self._schema = directory, prefix, to_table, schema

    def process(self, _, num_shards: int, written: list[str]):
        for shard in range(num_shards):
            path = f"{self._directory}/{shard_name(self._prefix, shard, num_shards)}"
            if path not in written:
                write_table_atomically(path, self._to_table([], self._schema))
            yield path


class WriteShards(beam.PTransform):
    """Records with an ``item_id`` -> ``directory/prefix-SSSSS-of-NNNNN.parquet``; outputs the paths."""

    def __init__(self, directory: str, to_table: Callable, schema: pa.Schema, *, num_shards: int = 0,
                 rows_per_shard: int = 200_000, prefix: str = "part"):
        super().__init__()
        self._directory, self._to_table, self._schema = directory.rstrip("/"), to_table, schema
        self._num_shards, self._rows_per_shard, self._prefix = num_shards, rows_per_shard, prefix

    def expand(self, records):
        fixed, per_shard = self._num_shards, self._rows_per_shard
        num_shards = (
            records
            | "Count" >> beam.combiners.Count.Globally()
            | "NumShards" >> beam.Map(lambda n: fixed or max(1, math.ceil(n / per_shard)))
        )
        shards = beam.pvalue.AsSingleton(num_shards)
        written = (
            records
            | "KeyByShard" >> beam.Map(lambda r, n: (shard_of(r.item_id, n), r), shards)
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(_WriteShard(self._directory, self._prefix, self._to_table, self._schema), shards)
        )
        return (
            records.pipeline
            | "Once" >> beam.Create([None])
            | "CompleteShards" >> beam.ParDo(
                _WriteEmptyShards(self._directory, self._prefix, self._to_table, self._schema),
                shards, beam.pvalue.AsList(written))
        )
