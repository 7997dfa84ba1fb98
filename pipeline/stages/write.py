"""Stage 5: write batches of rows as sharded Parquet, each shard atomically.

A record's shard is a stable hash of its item id, rows inside a shard are
sorted by item id, and each file is written under a temporary name and then
renamed: a retried bundle rewrites the same file with the same content, and a
reader never sees half a shard. Batches are first written as pieces (Arrow
IPC) where they are made; only paths and id hashes are shuffled.
"""
from __future__ import annotations

import hashlib
import logging
import math
import uuid

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.stages import faults
from pipeline.stages.stage_metrics import StageTimer
from pipeline.storage import write_atomically
from schemas.dead_letter import DEAD_LETTER_SCHEMA, DeadLetter


def shard_of(item_id: str, num_shards: int) -> int:
    """Stable across processes and runs (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha1(item_id.encode()).digest()[:8], "big") % num_shards



def shard_name(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}-{shard:05d}-of-{num_shards:05d}.parquet"


# Parquet dictionary encoding only where values repeat (one fingerprint per run, a few modality names). On
# vectors, ids and hashes it is wasted work: pyarrow builds a dictionary for every column by default and
# falls back to plain once it overflows; for 20k rows of 528-d vectors that took 3x the CPU of the whole
# write and made the file larger (docs/BENCHMARKS.md, issue 11 round 7). Column paths of any table written here.
DICTIONARY_COLUMNS = ["model_fingerprint", "modalities.list.element", "stage", "reason"]
WRITE_COMPRESSION = "zstd"


def write_table_atomically(path: str, table: pa.Table) -> None:
    """One Parquet table written atomically (``storage.write_atomically``); the crash hook is ``write_shard``."""
    write_atomically(path, lambda stream: pq.write_table(table, stream, compression=WRITE_COMPRESSION,
                                                         use_dictionary=DICTIONARY_COLUMNS),
                     lambda: faults.inject("write_shard"))


def dead_letters_to_table(rows: list[DeadLetter], schema: pa.Schema = DEAD_LETTER_SCHEMA) -> pa.Table:
    return pa.Table.from_pylist([r.to_row() for r in rows], schema=schema)


PIECES = ".pieces"  # under a run's output directory: batches written before their shard is known
CHUNK_ROWS = 16_384  # rows per Parquet row group, and the most rows a shard writer holds at once


def _hash64(item_ids: list[str]) -> np.ndarray:
    return np.fromiter((int.from_bytes(hashlib.sha1(i.encode()).digest()[:8], "big") for i in item_ids),
                       np.uint64, count=len(item_ids))


def _open_piece(path: str) -> pa.Table:
    """A piece as a table; memory-mapped when local, so a gather reads only the rows it takes."""
    if "://" not in path:
        with pa.memory_map(path) as source:
            return ipc.open_file(source).read_all()
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return ipc.open_file(pa.BufferReader(f.read())).read_all()


def _vector_matrix(table: pa.Table) -> np.ndarray:
    """A piece's ``vector`` column as a [rows, dim] numpy view of its (memory-mapped) buffer: no copy."""
    column = table.column("vector").combine_chunks()  # a piece is one record batch: no copy either
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


def write_piece(table: pa.Table, pieces_dir: str) -> tuple[str, np.ndarray] | None:
    """Writes one batch of rows, sorted by item id, as an Arrow IPC file; returns (path, 64-bit id hashes).

    The hashes decide each row's shard once the shard count is known; only they
    and the path travel on, so memory does not grow with the catalog.
    """
    if table.num_rows == 0:
        return None
    table = table.sort_by("item_id")
    path = f"{pieces_dir}/{uuid.uuid4().hex}.arrow"  # an attempt's own file: a retried bundle never clashes

    def write(stream):
        with ipc.new_file(stream, table.schema) as writer:
            writer.write_table(table)

    write_atomically(path, write)
    return path, _hash64(table.column("item_id").to_pylist())


def split_by_shard(piece: tuple[str, np.ndarray], num_shards: int) -> list[tuple[int, tuple[str, np.ndarray]]]:
    """A piece's rows grouped by shard: [(shard, (path, row numbers))], each shard once."""
    path, hashes = piece
    shards = hashes % np.uint64(num_shards)
    out = []
    for shard in np.unique(shards):
        out.append((int(shard), (path, np.flatnonzero(shards == shard).astype(np.int64))))
    return out


def assemble_shard(path: str, parts: list[tuple[str, np.ndarray]], schema: pa.Schema) -> int:
    """Writes one shard from its rows in the pieces, sorted by item id, ``CHUNK_ROWS`` at a time; returns rows."""
    parts = sorted(parts, key=lambda part: part[0])  # the same file whatever order the shuffle delivered
    ids = []
    for piece, rows in parts:
        ids.append(_open_piece(piece).column("item_id").take(pa.array(rows)).combine_chunks())
    all_ids = pa.concat_arrays(ids) if ids else pa.array([], pa.string())
    order = pc.sort_indices(all_ids).to_numpy()
    owner = np.repeat(np.arange(len(parts)), [len(rows) for _, rows in parts])
    local = np.concatenate([rows for _, rows in parts]) if parts else np.zeros(0, np.int64)

    has_vectors = "vector" in schema.names  # embeddings shards; dead-letter shards have none

    def write(stream):
        with pq.ParquetWriter(stream, schema, compression=WRITE_COMPRESSION, use_dictionary=DICTIONARY_COLUMNS) as writer:
            if not len(order):
                writer.write_table(schema.empty_table())
            for start in range(0, len(order), CHUNK_ROWS):
                chunk = order[start:start + CHUNK_ROWS]
                pieces, taken, positions, vectors = owner[chunk], [], [], None
                for p in np.unique(pieces):
                    mine = np.flatnonzero(pieces == p)
                    rows = local[chunk[mine]]
                    piece = _open_piece(parts[p][0])
                    if has_vectors:
                        # vectors (most of a row's bytes) are copied once, straight into their place in id
                        # order; the small columns are taken per piece and put in order below
                        values = _vector_matrix(piece)
                        if vectors is None:
                            vectors = np.empty((len(chunk), values.shape[1]), values.dtype)
                        vectors[mine] = values[rows]
                        piece = piece.drop_columns(["vector"])
                    taken.append(piece.take(pa.array(rows)))
                    positions.append(mine)
                restore = np.empty(len(chunk), np.int64)
                restore[np.concatenate(positions)] = np.arange(len(chunk))
                table = pa.concat_tables(taken).take(pa.array(restore))
                if vectors is not None:
                    vector = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
                    table = table.add_column(schema.get_field_index("vector"), "vector", vector)
                writer.write_table(table.cast(schema), row_group_size=CHUNK_ROWS)

    write_atomically(path, write, lambda: faults.inject("write_shard"))
    return len(order)


class _WriteShard(beam.DoFn):
    def __init__(self, directory: str, prefix: str, schema: pa.Schema):
        self._directory, self._prefix, self._schema = directory, prefix, schema

    def setup(self):
        self._timer = StageTimer("write")

    def process(self, element, num_shards: int):
        shard, parts = element
        parts = list(parts)
        path = f"{self._directory}/{shard_name(self._prefix, shard, num_shards)}"
        with self._timer.batch(sum(len(rows) for _, rows in parts)):
            assemble_shard(path, parts, self._schema)
        yield path


class _WriteEmptyShards(beam.DoFn):
    """Writes the shards no record hashed to, so the set is always complete; then drops the pieces."""

    def __init__(self, directory: str, prefix: str, schema: pa.Schema):
        self._directory, self._prefix, self._schema = directory, prefix, schema

    def process(self, num_shards: int, written: list[str]):
        for shard in range(num_shards):
            path = f"{self._directory}/{shard_name(self._prefix, shard, num_shards)}"
            if path not in written:
                write_table_atomically(path, self._schema.empty_table())
            yield path
        remove_pieces(f"{self._directory}/{PIECES}")


def remove_pieces(pieces: str) -> None:
    """Deletes a pieces folder once every shard is written; a failure to clean up never fails the run."""
    try:
        # by listing, not by folder: object stores (gs://) have no folders to delete
        listed = FileSystems.match([f"{pieces}/*"])[0].metadata_list
        if listed:
            FileSystems.delete([m.path for m in listed])
        if "://" not in pieces and FileSystems.exists(pieces):
            FileSystems.delete([pieces])
    except Exception as e:  # noqa: BLE001 - leftover pieces cost space, not correctness
        logging.getLogger(__name__).warning("could not remove %s: %s", pieces, e)


class _NumShards(beam.CombineFn):
    """Pieces -> the number of shards: ``fixed``, or enough for ``per_shard`` rows each (one combine, no maps)."""

    def __init__(self, fixed: int, per_shard: int):
        self._fixed, self._per_shard = fixed, per_shard

    def create_accumulator(self):
        return 0

    def add_input(self, rows, piece):
        return rows + len(piece[1])

    def merge_accumulators(self, accs):
        return sum(accs)

    def extract_output(self, rows):
        return self._fixed or max(1, math.ceil(rows / self._per_shard))


class WriteShards(beam.PTransform):
    """Batches of rows (``pa.Table`` in ``schema``) -> ``directory/prefix-SSSSS-of-NNNNN.parquet``; outputs the paths.

    Each batch is written at once as a piece (``directory/.pieces``), in the
    worker that made it; the one shuffle carries piece paths and id hashes,
    so each shard's rows meet in one worker, which writes the shard sorted by
    item id, a chunk at a time, atomically. Memory does not grow with the
    catalog, and a killed run's pieces stay for a rerun to reuse.
    """

    def __init__(self, directory: str, schema: pa.Schema, *, num_shards: int = 0,
                 rows_per_shard: int = 200_000, prefix: str = "part"):
        super().__init__()
        self._directory, self._schema = directory.rstrip("/"), schema
        self._num_shards, self._rows_per_shard, self._prefix = num_shards, rows_per_shard, prefix

    def expand(self, tables):
        """``tables``: one PCollection of ``pa.Table`` batches, or a tuple of them (each written where it is made)."""
        fixed, per_shard = self._num_shards, self._rows_per_shard
        pieces_dir = f"{self._directory}/{PIECES}"
        sources = tables if isinstance(tables, tuple) else (tables,)
        # applied to each source, not to a Flatten of them, so a piece is written in the stage that made its
        # batch (a runner may materialize a Flatten's inputs, which would hold every batch in memory)
        refs = [src | f"WritePieces{i or ''}" >> beam.FlatMap(
            lambda t: [p for p in [write_piece(t, pieces_dir)] if p]) for i, src in enumerate(sources)]
        pieces = refs[0] if len(refs) == 1 else tuple(refs) | "AllPieces" >> beam.Flatten()
        num_shards = pieces | "NumShards" >> beam.CombineGlobally(_NumShards(fixed, per_shard))
        shards = beam.pvalue.AsSingleton(num_shards)
        written = (
            pieces
            | "SplitByShard" >> beam.FlatMap(split_by_shard, shards)
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(_WriteShard(self._directory, self._prefix, self._schema), shards)
        )
        # the shard count (one element, always: the combine has a default) starts the last step; a Create of
        # its own would add two ParDos to every run's fixed cost (docs/BENCHMARKS.md, issue 11 round 8)
        return num_shards | "CompleteShards" >> beam.ParDo(
            _WriteEmptyShards(self._directory, self._prefix, self._schema), beam.pvalue.AsList(written))
