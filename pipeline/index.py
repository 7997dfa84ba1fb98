"""Stage 6: train one IVF-PQ index on a sample, fill one index shard per embeddings shard, check recall.

The stage reads only the written embeddings files, so it can also index an
existing run. Its graph:

    embeddings files -> sample rows (smallest id hashes, per file, then a combiner) -> train once
                     -> per file: add to a copy of the trained index (side input) -> shard + ids
                     -> recall self-check over all shards (+ optional merged index) -> index info

The sample is deterministic (the rows whose item-id hash is smallest), so a
rerun on the same embeddings trains the same index. Every file is written
under a temporary name and renamed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import time
import uuid

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline import indexing
from pipeline.config import IndexConfig
from pipeline.write import write_table_atomically
from schemas.embeddings import vectors_of

NAMESPACE = "catalog_index.index"
TRAINED = "trained.faiss"
MERGED = "merged.faiss"
_PART_RE = re.compile(r"part-(\d+)-of-\d+\.parquet$")
log = logging.getLogger("pipeline.index")


def write_bytes_atomically(path: str, data: bytes) -> None:
    directory, _, name = path.rpartition("/")
    tmp = f"{directory}/.tmp-{uuid.uuid4().hex}-{name}"
    with FileSystems.create(tmp) as f:
        f.write(data)
    FileSystems.rename([tmp], [path])


def read_bytes(path: str) -> bytes:
    with FileSystems.open(path) as f:
        return f.read()


def shard_number(path: str) -> int:
    """The shard number of an embeddings file ``part-SSSSS-of-NNNNN.parquet``."""
    match = _PART_RE.search(path)
    if not match:
        raise ValueError(f"not an embeddings shard name (part-SSSSS-of-NNNNN.parquet): {path}")
    return int(match.group(1))


def index_shard_paths(index_dir: str, shard: int) -> tuple[str, str]:
    return f"{index_dir}/shard-{shard:05d}.faiss", f"{index_dir}/ids-{shard:05d}.parquet"


def read_shard(path: str) -> tuple[list[str], np.ndarray]:
    with FileSystems.open(path) as f:
        table = pq.read_table(f, columns=["item_id", "vector"])
    return table.column("item_id").to_pylist(), vectors_of(table)


def sample_keys(item_ids: list[str]) -> np.ndarray:
    """A stable 63-bit hash per item id: the sample is the rows with the smallest keys."""
    return np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big") >> 1
                     for i in item_ids], dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class VectorSample:
    """The rows with the smallest keys seen so far, and how many rows were seen."""

    keys: np.ndarray
    item_ids: tuple[str, ...]
    vectors: np.ndarray
    seen: int

    @staticmethod
    def of(keys: np.ndarray, item_ids, vectors: np.ndarray, seen: int, size: int) -> "VectorSample":
        order = np.argsort(keys, kind="stable")[:size]
        return VectorSample(keys[order], tuple(item_ids[i] for i in order), vectors[order], seen)


class SmallestKeys(beam.CombineFn):
    """Combiner keeping the ``size`` rows with the smallest keys: a deterministic fixed-size sample."""

    def __init__(self, size: int):
        self._size = size

    def create_accumulator(self):
        return None

    def add_input(self, acc, sample: VectorSample):
        return self.merge_accumulators([acc, sample])

    def merge_accumulators(self, accs):
        accs = [a for a in accs if a is not None]
        if not accs:
            return None
        if len(accs) == 1:
            return accs[0]
        ids = [i for a in accs for i in a.item_ids]
        return VectorSample.of(np.concatenate([a.keys for a in accs]), ids,
                               np.concatenate([a.vectors for a in accs]), sum(a.seen for a in accs), self._size)

    def extract_output(self, acc):
        return acc


@dataclasses.dataclass(frozen=True)
class TrainedIndex:
    """The empty trained index (serialized) and the held-out recall queries."""

    params: indexing.IndexParams
    index_bytes: bytes
    query_ids: tuple[str, ...]
    queries: np.ndarray
    held_out: bool  # False when the sample was too small to keep queries out of training
    total_vectors: int
    train_vectors: int
    train_s: float
    path: str


@dataclasses.dataclass(frozen=True)
class ShardResult:
    """One filled index shard and its exact top-k for the recall queries (ground truth, merged later)."""

    shard: int
    index_path: str
    ids_path: str
    count: int
    exact_scores: np.ndarray  # [queries, k + 1]: one more, as a query may find itself
    exact_ids: np.ndarray
    query_faiss_ids: np.ndarray  # per query: its faiss id if its item is in this shard, else -1
    add_s: float


def split_sample(sample: VectorSample | None, config: IndexConfig, dim: int
                 ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], bool, int]:
    """(train vectors, query vectors, query ids, held out?, total rows) from the combined sample."""
    if sample is None or not len(sample.item_ids):
        empty = np.zeros((0, dim), np.float32)
        return empty, empty, (), False, 0 if sample is None else sample.seen
    nq = config.num_queries
    if len(sample.item_ids) >= 2 * nq:  # enough rows: the first nq by key are never trained on
        return sample.vectors[nq:], sample.vectors[:nq], sample.item_ids[:nq], True, sample.seen
    # a small catalog: query with (up to nq of) the same rows it trained on, and say so
    return sample.vectors, sample.vectors[:nq], sample.item_ids[:nq], False, sample.seen


class _SampleFile(beam.DoFn):
    def __init__(self, size: int):
        self._size = size

    def process(self, path: str):
        item_ids, vectors = read_shard(path)
        yield VectorSample.of(sample_keys(item_ids), item_ids, vectors, len(item_ids), self._size)


class _Train(beam.DoFn):
    def __init__(self, config: IndexConfig, index_dir: str, dim: int):
        self._config, self._dir, self._dim = config, index_dir, dim

    def process(self, _, sample: VectorSample | None):
        c = self._config
        train, queries, query_ids, held_out, total = split_sample(sample, c, self._dim)
        params = indexing.choose_params(total, self._dim, len(train), metric=c.metric, memory_gb=c.memory_gb,
                                        factory=c.factory, nlist=c.nlist, m=c.m, nbits=c.nbits, opq=c.opq)
        if params.kind == "flat" and params.note:
            log.warning("index: %s", params.note)
        start = time.perf_counter()
        index = indexing.train_index(params, train)
        train_s = time.perf_counter() - start
        data = indexing.to_bytes(index)
        path = f"{self._dir}/{TRAINED}"
        write_bytes_atomically(path, data)
        log.info("index: trained %s on %d of %d vectors in %.1f s", params.factory, len(train), total, train_s)
        yield TrainedIndex(params, data, query_ids, queries, held_out, total, len(train), train_s, path)


class _FillShard(beam.DoFn):
    def __init__(self, index_dir: str, k: int):
        self._dir, self._k = index_dir, k
        self._vectors = Metrics.counter(NAMESPACE, "vectors_added")

    def process(self, path: str, trained: TrainedIndex):
        shard = shard_number(path)
        item_ids, vectors = read_shard(path)
        start = time.perf_counter()
        index, ids = indexing.fill_shard(trained.index_bytes, vectors, shard)
        add_s = time.perf_counter() - start
        index_path, ids_path = index_shard_paths(self._dir, shard)
        write_table_atomically(ids_path, indexing.ids_table(ids, item_ids))
        write_bytes_atomically(index_path, indexing.to_bytes(index))
        scores, exact = indexing.exact_topk(vectors, ids, trained.queries, self._k + 1, trained.params.metric)
        row_of = {item: row for row, item in enumerate(item_ids)}
        own = np.array([ids[row_of[q]] if q in row_of else -1 for q in trained.query_ids], np.int64)
        self._vectors.inc(len(ids))
        yield ShardResult(shard, index_path, ids_path, len(ids), scores, exact, own, add_s)


class _CheckRecall(beam.DoFn):
    """Opens every shard as the serving loader does, compares it with exact search, merges if asked."""

    def __init__(self, config: IndexConfig, index_dir: str, run_dir: str):
        self._config, self._dir, self._run_dir = config, index_dir, run_dir

    def _rel(self, path: str) -> str:
        return path[len(self._run_dir) + 1:]

    def process(self, _, trained: TrainedIndex, shards: list[ShardResult]):
        c, params = self._config, trained.params
        shards = sorted(shards, key=lambda s: s.shard)
        indexes = [indexing.from_bytes(read_bytes(s.index_path)) for s in shards]
        sharded = indexing.ShardedIndex(indexes, params.metric)
        table, recommended, reached = [], None, False
        if len(trained.queries) and sharded.ntotal:
            own = np.max([s.query_faiss_ids for s in shards], axis=0)
            _, truth = indexing.merge_topk([(s.exact_scores, s.exact_ids) for s in shards], c.k + 1, params.metric)
            truth = indexing.drop_self(truth, own, c.k)
            table = indexing.recall_table(sharded, trained.queries, truth, c.k, c.nprobes, exclude=own)
            recommended, reached = indexing.recommend_nprobe(table, c.target_recall, c.k)
        files = [trained.path] + [p for s in shards for p in (s.index_path, s.ids_path)]
        merged = None
        if c.merge:
            merged = f"{self._dir}/{MERGED}"
            write_bytes_atomically(merged, indexing.to_bytes(indexing.merge_shards(trained.index_bytes, indexes)))
            files.append(merged)
        yield {
            **params.to_json(),
            "ntotal": sharded.ntotal,
            "id_layout": {"row_bits": indexing.ROW_BITS, "faiss_id": "shard << row_bits | row"},
            "score": "inner product" if params.metric == "ip" else "negative squared L2 distance",
            "trained": self._rel(trained.path),
            "shards": [{"shard": s.shard, "index": self._rel(s.index_path), "ids": self._rel(s.ids_path),
                        "count": s.count} for s in shards],
            "merged": self._rel(merged) if merged else None,
            "training": {"vectors": trained.train_vectors, "seconds": round(trained.train_s, 3)},
            "add_seconds": round(sum(s.add_s for s in shards), 3),
            "recall": {
                "k": c.k, "queries": len(trained.queries), "held_out": trained.held_out,
                "ground_truth": "exact search over every indexed vector, the query's own item excluded",
                "target_recall": c.target_recall, "recommended_nprobe": recommended, "target_reached": reached,
                "table": table,
            },
            "files": files,
        }


class BuildIndex(beam.PTransform):
    """Embeddings file paths -> one dict describing the index (for the manifest), after every file is written."""

    def __init__(self, config: IndexConfig, run_dir: str, dim: int):
        super().__init__()
        self._config, self._run_dir, self._dim = config, run_dir.rstrip("/"), dim
        self._index_dir = f"{self._run_dir}/index"

    def expand(self, embedding_files):
        c, p = self._config, embedding_files.pipeline
        size = c.train_size + c.num_queries
        sample = (
            embedding_files
            | "SampleFiles" >> beam.ParDo(_SampleFile(size))
            | "Sample" >> beam.CombineGlobally(SmallestKeys(size))
        )
        trained = (
            p
            | "Once" >> beam.Create([None])
            | "Train" >> beam.ParDo(_Train(c, self._index_dir, self._dim), beam.pvalue.AsSingleton(sample))
        )
        trained_side = beam.pvalue.AsSingleton(trained)
        shards = (
            embedding_files
            | "Reshuffle" >> beam.Reshuffle()  # spread shards over workers
            | "FillShards" >> beam.ParDo(_FillShard(self._index_dir, c.k), trained_side)
        )
        return (
            p
            | "OnceMore" >> beam.Create([None])
            | "CheckRecall" >> beam.ParDo(_CheckRecall(c, self._index_dir, self._run_dir), trained_side,
                                          beam.pvalue.AsList(shards))
        )
