"""Stage 6: choose and train one index on a sample, fill the index shards from the embeddings files, check recall.

The stage reads only the written embeddings files, so it can also index an
existing run. Its graph:

    embeddings files -> sample positions (ids only: smallest id hashes, per file, then a combiner)
                     -> train once (reads the chosen rows' vectors, each file once)
                     -> per index shard (a contiguous run of files, ceil(N / shard_vectors) shards at most one per
                        file): add to a copy of the trained index (side input) -> shard + ids
                     -> recall self-check over all shards (+ optional merged index) -> index info

A catalog of one index shard (up to ``--index_shard_vectors`` vectors) is filled
by the train step itself, from the files its sample read took whole: every
file is then read once (ids, then rows), as a bare faiss script reads it.

Every index shard file carries the trained fixed part (coarse centroids,
codebooks, OPQ) again, so a catalog that fits one shard is one: the memory
budget then pays for that part once.

The sample is deterministic (the rows whose item-id hash is smallest), so a
rerun on the same embeddings trains the same index. On an incremental run the
train step may instead reuse the previous run's trained index, when its
quantization error on this run's held-out sample rows shows no drift
(pipeline/index/quantizer_reuse.py); the shards are rebuilt either way. Every file is written
under a temporary name and renamed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import time
from typing import Sequence

import apache_beam as beam
import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics

from encoders.digest import sha256_hex
from pipeline.index import index_select, indexing, quantizer_reuse
from pipeline.config import IndexConfig
from pipeline.stages.incremental import PreviousRun
from pipeline.index.quantizer_reuse import PreviousQuantizer
from pipeline.query.recall_queries import RecallQueries
from pipeline.stages.stage_metrics import StageTimer
from pipeline.stages.write import write_table_atomically
from pipeline.storage import read_bytes, read_manifest, read_table, write_atomically, write_bytes_atomically
from schemas.embeddings import vectors_of
from schemas.manifest import recall_key

NAMESPACE = "catalog_index.index"
TRAINED = "trained.faiss"
MERGED = "merged.faiss"
_PART_RE = re.compile(r"part-(\d+)-of-(\d+)\.parquet$")
log = logging.getLogger("pipeline.stages.index")


def shard_number(path: str) -> int:
    """The shard number of an embeddings file ``part-SSSSS-of-NNNNN.parquet``."""
    match = _PART_RE.search(path)
    if not match:
        raise ValueError(f"not an embeddings shard name (part-SSSSS-of-NNNNN.parquet): {path}")
    return int(match.group(1))


def file_count(path: str) -> int:
    """The NNNNN of an embeddings file ``part-SSSSS-of-NNNNN.parquet``: how many files its run wrote."""
    match = _PART_RE.search(path)
    if not match:
        raise ValueError(f"not an embeddings shard name (part-SSSSS-of-NNNNN.parquet): {path}")
    return int(match.group(2))


def index_shard_paths(index_dir: str, shard: int) -> tuple[str, str]:
    return f"{index_dir}/shard-{shard:05d}.faiss", f"{index_dir}/ids-{shard:05d}.parquet"


def read_shard(path: str) -> tuple[list[str], np.ndarray]:
    ids, vectors = read_columns(path)
    return ids.to_pylist(), vectors


def read_columns(path: str) -> tuple[pa.Array, np.ndarray]:
    """(item ids as read, vectors) of an embeddings file: the ids stay an Arrow array, since a shard only
    writes them back (1M Python strings cost about half a second each way)."""
    table = read_table(path, ["item_id", "vector"])
    return table.column("item_id").combine_chunks(), vectors_of(table)


def sample_keys(item_ids: list[str]) -> np.ndarray:
    """A stable 63-bit hash per item id: the sample is the rows with the smallest keys."""
    return np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big") >> 1
                     for i in item_ids], dtype=np.int64)


def read_ids(path: str) -> list[str]:
    """Only the ``item_id`` column of an embeddings file: what the sample's first phase needs."""
    return read_table(path, ["item_id"]).column("item_id").to_pylist()


def read_rows(path: str, rows: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(item ids, vectors) of the given rows of an embeddings file, in the order given."""
    table = read_table(path, ["item_id", "vector"]).take(pa.array(rows, pa.int64()))
    return table.column("item_id").to_pylist(), vectors_of(table)


@dataclasses.dataclass(frozen=True)
class KeySample:
    """The rows with the smallest keys seen so far, as (file, row) positions and no vectors, ascending by key.

    The sample's first phase: tens of bytes per row travel through the combiner and
    the side input instead of a vector each; the chosen rows' vectors are read once,
    by ``read_sample``, where the index is trained.
    """

    keys: np.ndarray  # int64, ascending
    file_of: np.ndarray  # int32: index into ``paths``
    rows: np.ndarray  # int64: the row in its file
    paths: tuple[str, ...]  # every file seen, so len(paths) files (one index shard each at most)
    seen: int  # rows seen
    seconds: float = 0.0  # reading and hashing the ids, summed over files

    @property
    def files(self) -> int:
        return len(self.paths)

    @staticmethod
    def of_file(path: str, item_ids: list[str], size: int) -> "KeySample":
        keys = sample_keys(item_ids)
        order = np.argsort(keys, kind="stable")[:size]
        return KeySample(keys[order], np.zeros(len(order), np.int32), order.astype(np.int64), (path,), len(keys))

    @staticmethod
    def merge(samples: Sequence["KeySample"], size: int) -> "KeySample":
        offsets = np.cumsum([0] + [len(s.paths) for s in samples])
        keys = np.concatenate([s.keys for s in samples])
        order = np.argsort(keys, kind="stable")[:size]  # ties (repeated ids) keep their arrival order
        file_of = np.concatenate([s.file_of + off for s, off in zip(samples, offsets)]).astype(np.int32)
        return KeySample(keys[order], file_of[order], np.concatenate([s.rows for s in samples])[order],
                         tuple(p for s in samples for p in s.paths), sum(s.seen for s in samples),
                         sum(s.seconds for s in samples))


@dataclasses.dataclass(frozen=True)
class VectorSample:
    """The sample's rows, ascending by key: item ids and vectors (phase two, read where they are trained on)."""

    keys: np.ndarray
    item_ids: tuple[str, ...]
    vectors: np.ndarray
    seen: int
    files: int = 1  # embeddings files seen: one index shard each, for the memory preflight


def read_sample(sample: KeySample, dim: int, whole: dict[str, tuple[pa.Array, np.ndarray]] | None = None
                ) -> VectorSample:
    """The second phase: each file holding chosen rows is read once, for those rows only.

    A file whose ids no longer hash to the recorded keys (rewritten between the
    two phases) is an error, not a silently different sample. The files are read
    one after another by the one worker that trains (the vector column whole, then
    the rows taken): 4.5x cheaper than carrying vectors through Beam on 200k x 384
    (bench/bench_index_sample.py); far larger catalogs would want it spread over the files.
    Given ``whole``, every file seen is read and kept there whole, (item ids, vectors)
    by path: the train step then fills a single index shard without reading them again.
    """
    vectors = np.zeros((len(sample.keys), dim), np.float32)
    item_ids: list[str] = [""] * len(sample.keys)
    for f in (range(len(sample.paths)) if whole is not None else np.unique(sample.file_of)):
        at = np.flatnonzero(sample.file_of == f)
        if whole is not None:
            whole[sample.paths[f]] = read_columns(sample.paths[f])
            all_ids, all_vecs = whole[sample.paths[f]]
            ids, vecs = all_ids.take(pa.array(sample.rows[at], pa.int64())).to_pylist(), all_vecs[sample.rows[at]]
        else:
            ids, vecs = read_rows(sample.paths[f], sample.rows[at])
        if not np.array_equal(sample_keys(ids), sample.keys[at]):
            raise ValueError(f"{sample.paths[f]} changed while the index sample was read: its rows' ids differ")
        vectors[at] = vecs
        for row, item in zip(at, ids):
            item_ids[row] = item
    return VectorSample(sample.keys, tuple(item_ids), vectors, sample.seen, sample.files)


class SmallestKeys(beam.CombineFn):
    """Combiner keeping the ``size`` rows with the smallest keys: a deterministic fixed-size sample."""

    def __init__(self, size: int):
        self._size = size

    def create_accumulator(self):
        return None

    def add_input(self, acc, sample: KeySample):
        return self.merge_accumulators([acc, sample])

    def merge_accumulators(self, accs):
        accs = [a for a in accs if a is not None]
        if not accs:
            return None
        if len(accs) == 1:
            return accs[0]
        return KeySample.merge(accs, self._size)

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
    quantizer: dict  # the manifest's index.quantizer (schemas.manifest.Quantizer as JSON): trained or reused, why
    decide_s: float = 0.0
    recall_queries: np.ndarray | None = None  # the run's own encoded queries (--recall_queries), or None
    candidates: tuple = ()  # the manifest's index.candidates (pipeline/index/index_select.py)
    chosen: dict | None = None  # the manifest's index.chosen: name, params, why
    selection_s: float = 0.0
    index_shards: int = 1  # how many index shards the embeddings files are grouped into
    sample_read_s: float = 0.0  # the sample's second phase: its rows' vectors read
    sample_ids_s: float = 0.0  # the sample's first phase: ids read and hashed, summed over files
    filled: bool = False  # the one index shard was filled by the train step, from the files it read whole
    shard: "ShardResult | None" = None  # that shard (a field, not a second output: the bundle-based DirectRunner
                                         # mixed a tagged output of this side-input step into its main output)

    def index_shard_of(self, path: str) -> int:
        """The index shard embeddings file ``path`` is filled into."""
        return indexing.index_shard_of(shard_number(path), file_count(path), self.index_shards)

    @property
    def all_queries(self) -> np.ndarray:
        """Held-out queries, then the recall queries: the rows every shard computes exact top-k for."""
        if self.recall_queries is None or not len(self.recall_queries):
            return self.queries
        return np.concatenate([self.queries, self.recall_queries]).astype(np.float32)


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
    truth_s: float = 0.0  # the exact top-k: self-check work, done here where the shard's vectors are in memory
    files: tuple[str, ...] = ()  # the embeddings files whose rows it holds, in row order
    read_s: float = 0.0  # reading its embeddings files
    write_s: float = 0.0  # writing the shard and its ids
    from_selection: int = 0  # rows it held already: the selection's measured winner it started from


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
    """An embeddings file -> the positions of its rows with the smallest keys (its ids read, not its vectors)."""

    def __init__(self, size: int):
        self._size = size

    def process(self, path: str):
        start = time.perf_counter()
        sample = KeySample.of_file(path, read_ids(path), self._size)
        yield dataclasses.replace(sample, seconds=time.perf_counter() - start)


def _load_trained(previous: PreviousQuantizer):
    """The previous run's trained index, refused if its bytes are not the ones its manifest lists."""
    data = read_bytes(previous.trained_path)
    if previous.sha256 and sha256_hex(data) != previous.sha256:
        raise ValueError(f"{previous.trained_path} does not match the sha256 in its run's manifest")
    return indexing.from_bytes(data)


def _rows_in_shard(keys: KeySample, whole: dict[str, tuple[pa.Array, np.ndarray]], held_out: bool,
                   num_queries: int) -> np.ndarray:
    """The training rows' positions in the one index shard (its files in shard order, rows in file order)."""
    paths = sorted(whole, key=shard_number)
    offset = dict(zip(paths, np.cumsum([0] + [len(whole[p][0]) for p in paths])))
    rows = np.array([offset[keys.paths[f]] for f in keys.file_of], np.int64) + keys.rows
    return rows[num_queries:] if held_out else rows


class _Train(beam.DoFn):
    """Chooses and trains the empty index on the sample, or reuses the previous run's when the drift allows.

    Automatic parameters go through candidate selection (pipeline/index/index_select.py);
    ``--index_factory`` or explicit nlist/M/nbits/OPQ skip it and train what they say.
    """

    def __init__(self, config: IndexConfig, index_dir: str, dim: int, previous: PreviousQuantizer | None = None,
                 unavailable: str = "", model_fingerprint: str = "", run_id: str = "",
                 recall_queries: np.ndarray | None = None):
        self._config, self._dir, self._dim = config, index_dir, dim
        self._previous, self._unavailable = previous, unavailable
        self._fp, self._run_id = model_fingerprint, run_id
        self._recall_queries = recall_queries

    def _automatic(self) -> bool:
        c = self._config
        return not (c.factory or c.nlist or c.m or c.nbits or c.opq)

    def setup(self):
        self._vectors = Metrics.counter(NAMESPACE, "vectors_added")
        self._timer = StageTimer("index")

    def process(self, _, keys: KeySample | None):
        c = self._config
        start = time.perf_counter()
        # one index shard: the sample's read takes every file whole anyway (each holds sample rows), so this
        # step keeps them and fills the shard itself, and no file is read twice (the vectors, at most
        # --index_shard_vectors of them, are held here through the selection)
        one_shard = keys is not None and indexing.index_shard_count(keys.seen, keys.files, c.shard_vectors) == 1
        whole: dict[str, tuple[pa.Array, np.ndarray]] | None = {} if one_shard else None
        sample = read_sample(keys, self._dim, whole) if keys is not None else None
        sample_read_s = time.perf_counter() - start
        if sample is not None:
            log.info("index: sample of %d rows read from %d file(s) in %.1f s", len(sample.keys),
                     len(np.unique(keys.file_of)), time.perf_counter() - start)
        train, queries, query_ids, held_out, total = split_sample(sample, c, self._dim)
        index_shards = indexing.index_shard_count(total, sample.files if sample is not None else 1, c.shard_vectors)
        rq = self._recall_queries
        # rows never trained on: the recall queries when the sample had room to hold them out
        unseen = queries if held_out else np.zeros((0, self._dim), np.float32)
        select = self._automatic() and index_select.choose_nlist(total, len(train))[0] > 0
        decision, reused, decide_s, selection, chosen = None, None, 0.0, None, None
        held: np.ndarray | None = None  # the training rows' positions in the one index shard filled here
        if select or not self._automatic():
            params = None if select else indexing.choose_params(
                total, self._dim, len(train), metric=c.metric, memory_gb=c.memory_gb, factory=c.factory,
                nlist=c.nlist, m=c.m, nbits=c.nbits, opq=c.opq)
            if params is None or params.kind == "ivfpq":
                start = time.perf_counter()
                # an automatic run offers the previous run's choice first: reusing it skips the selection too
                previous, unavailable = self._previous, self._unavailable
                factory = params.factory if params is not None else (previous.factory if previous else "")
                if params is None and previous is not None and \
                        previous.bytes_per_vector * total > c.memory_gb * (1 << 30):
                    previous, unavailable = None, (f"the previous run's {previous.factory} would take "
                                                   f"{previous.bytes_per_vector * total / (1 << 30):.3g} GB, over "
                                                   f"the memory budget of {c.memory_gb:g} GB")
                decision, reused = quantizer_reuse.decide(
                    previous, lambda: _load_trained(previous), unseen, factory=factory,
                    metric=c.metric, model_fingerprint=self._fp, setting=c.reuse_quantizer,
                    tolerance=c.quantizer_drift_tolerance, unavailable=unavailable)
                decide_s = time.perf_counter() - start
                log.info("index: quantizer %s: %s", "reused" if decision.reuse else "not reused", decision.reason)
            if params is None and reused is not None:
                bpv = self._previous.bytes_per_vector
                params = dataclasses.replace(
                    indexing.params_for_factory(self._previous.factory, c.metric, self._dim, total,
                                                family=self._previous.family),
                    bytes_per_vector=bpv, estimated_bytes=int(bpv * total))
                chosen = {"name": params.factory, "family": params.family, "params": self._previous.search_params,
                          "why": f"reused the trained index of run {self._previous.trained_run_id} "
                                 f"({decision.reason}); candidate selection skipped", "query_set": None}
        else:  # too few vectors for IVF: exact search, whose memory is negligible at this size
            params = indexing.choose_params(total, self._dim, len(train), metric=c.metric, memory_gb=c.memory_gb)
            # the note says what the selection needed, not what the IVF-PQ formula would
            params = dataclasses.replace(params, note=index_select.choose_nlist(total, len(train))[1]
                                         + ": using an exact flat index")
        if params is not None and params.kind == "flat" and params.note:
            log.warning("index: %s", params.note)
        start = time.perf_counter()
        if reused is not None:
            index, trained_on, fresh = reused, 0, decision.sample_error
        elif params is None:
            # one shard filled here: the measured winner already holds the training rows, under their shard ids
            held = _rows_in_shard(keys, whole, held_out, c.num_queries) if whole is not None and keys else None
            selection = index_select.select(
                total, self._dim, train, self._query_sets(train, queries, rq), metric=c.metric,
                memory_gb=c.memory_gb, target=c.target_recall, max_query_ms=c.max_query_ms, k=c.k,
                shards=index_shards, log=log.info,
                train_ids=None if held is None else indexing.make_ids(0, total)[held])
            index, params, chosen = selection.index, selection.params, selection.chosen
            trained_on = min(len(train), index_select.MAX_POINTS_PER_LIST * max(params.nlist, 1))
            fresh = None
        else:
            index, trained_on = indexing.train_index(params, train), len(train)
            fresh = None
            chosen = {"name": params.factory, "family": params.family or params.kind, "params": {},
                      "why": params.note or "set by the index options (no candidate selection)", "query_set": None}
        train_s = selection.train_seconds if selection else time.perf_counter() - start
        reusable = params.kind == "ivfpq" and (not params.family or params.family in index_select.REUSABLE_FAMILIES)
        if reused is None and reusable:
            fresh = quantizer_reuse.held_out_error(index, unseen)
        if not reusable:
            decision = None
        # a reused quantizer is written again here, byte for byte, so this run never depends on the old one
        data = indexing.to_bytes(index)
        path = f"{self._dir}/{TRAINED}"
        write_bytes_atomically(path, data)
        quantizer = quantizer_reuse.manifest_block(
            decision, setting=c.reuse_quantizer, model_fingerprint=self._fp, previous=self._previous,
            fresh_error=fresh, held_out_vectors=len(unseen), run_id=self._run_id,
            not_applicable=f"{params.family or params.kind} index: no trained quantizer to reuse")
        if reused is None:
            log.info("index: trained %s on %d of %d vectors in %.1f s", params.factory, trained_on, total, train_s)
        trained = TrainedIndex(params, data, query_ids, queries, held_out, total, trained_on, train_s, path,
                               quantizer, decide_s, rq, tuple(selection.candidates) if selection else (), chosen,
                               selection.seconds if selection else 0.0, index_shards, sample_read_s,
                               keys.seconds if keys is not None else 0.0, filled=whole is not None)
        if whole is not None:
            paths = sorted(whole, key=shard_number)
            prefilled = (selection.filled, held) if selection is not None and selection.filled is not None else None
            result = fill_index_shard(0, paths, [whole.pop(p) for p in paths], trained, self._dir, c.k, self._timer,
                                      prefilled=prefilled)
            self._vectors.inc(result.count)
            trained = dataclasses.replace(trained, shard=result)
        yield trained

    def _query_sets(self, train: np.ndarray, queries: np.ndarray, rq: np.ndarray | None
                    ) -> list[index_select.QuerySet]:
        """Queries over the training rows (the database the candidates are measured on); their exact top-k is
        computed as the selection asks for it (index_select.QuerySet)."""
        k, metric = self._config.k, self._config.metric
        return [index_select.QuerySet(name, q, database=train, metric=metric, k=k)
                for name, q in (("held_out", queries), ("recall_queries", rq)) if q is not None and len(q)]


def fill_index_shard(shard: int, paths: Sequence[str], parts: Sequence[tuple[pa.Array | list[str], np.ndarray]],
                     trained: TrainedIndex, index_dir: str, k: int, timer: StageTimer, read_s: float = 0.0,
                     prefilled: tuple[faiss.Index, np.ndarray] | None = None) -> ShardResult:
    """One index shard from its files' rows (``parts``, in ``paths`` order): a copy of the trained index
    filled, written (ids, then the index), and its exact top-k for the recall queries. ``prefilled``: the
    selection's measured index and the rows it already holds (under their ids); only the others are added.

    The parts are added, searched and written one by one, never concatenated: at 1M x 512 a concatenation
    (and the copy of the rows not held yet) was 2 GB of copying that the bare faiss script does not do.
    """
    sizes = [len(v) for _, v in parts]
    offsets = np.cumsum([0] + sizes)
    ids = indexing.make_ids(shard, int(offsets[-1]))
    start = time.perf_counter()
    with timer.batch(len(ids)):
        index = indexing.from_bytes(trained.index_bytes) if prefilled is None else prefilled[0]
        indexing.add_parts(index, [v for _, v in parts], ids, None if prefilled is None else prefilled[1])
    add_s = time.perf_counter() - start
    start = time.perf_counter()
    index_path, ids_path = index_shard_paths(index_dir, shard)
    write_table_atomically(ids_path, indexing.ids_table(ids, _item_ids(parts)))
    write_atomically(index_path, lambda stream: indexing.write_index(index, stream))
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    queries, metric = trained.all_queries, trained.params.metric
    scores, exact = indexing.merge_topk([indexing.exact_topk(v, ids[lo:lo + len(v)], queries, k + 1, metric)
                                         for (_, v), lo in zip(parts, offsets)], k + 1, metric)
    truth_s = time.perf_counter() - start
    own = _query_rows(parts, offsets, trained.query_ids)
    own = np.where(own >= 0, ids[np.maximum(own, 0)], -1)
    own = np.concatenate([own, np.full(len(queries) - len(own), -1, np.int64)])  # recall queries
    return ShardResult(shard, index_path, ids_path, len(ids), scores, exact, own, add_s, truth_s,
                       tuple(paths), read_s, write_s, 0 if prefilled is None else len(prefilled[1]))


def _item_ids(parts: Sequence[tuple[pa.Array | list[str], np.ndarray]]) -> pa.Array:
    """The parts' item ids as one Arrow array (Arrow arrays as read are joined without a Python string each)."""
    arrays = [ids if isinstance(ids, pa.Array) else pa.array(ids, pa.string()) for ids, _ in parts]
    if not arrays:
        return pa.array([], pa.string())
    return arrays[0] if len(arrays) == 1 else pa.concat_arrays([a.cast(pa.string()) for a in arrays])


def _query_rows(parts: Sequence[tuple[pa.Array | list[str], np.ndarray]], offsets: np.ndarray,
                query_ids: Sequence[str]) -> np.ndarray:
    """Per query id: its row in the shard (the last one, if repeated), or -1; found by Arrow, not a dict of
    every row."""
    if not query_ids:
        return np.zeros(0, np.int64)
    wanted = pa.array(list(query_ids), pa.string())
    found: dict[str, int] = {}
    for (ids, _), lo in zip(parts, offsets):
        column = ids if isinstance(ids, pa.Array) else pa.array(ids, pa.string())
        hit = pc.is_in(column.cast(pa.string()), value_set=wanted)
        rows = np.flatnonzero(hit.to_numpy(zero_copy_only=False))
        for row, item in zip(rows, column.take(pa.array(rows, pa.int64())).to_pylist()):
            found[item] = int(lo + row)
    return np.array([found.get(q, -1) for q in query_ids], np.int64)


class _FillShard(beam.DoFn):
    """(index shard, its embeddings files) -> one filled index shard: the files' rows in file order."""

    def __init__(self, index_dir: str, k: int):
        self._dir, self._k = index_dir, k
        self._vectors = Metrics.counter(NAMESPACE, "vectors_added")
        self._timer = StageTimer("index")

    def process(self, group: tuple[int, list[str]], trained: TrainedIndex):
        shard, paths = group[0], sorted(group[1], key=shard_number)
        start = time.perf_counter()
        parts = [read_columns(path) for path in paths]
        result = fill_index_shard(shard, paths, parts, trained, self._dir, self._k, self._timer,
                                  time.perf_counter() - start)
        self._vectors.inc(result.count)
        yield result


def self_check_settings(params: indexing.IndexParams, config: IndexConfig, selected: bool) -> list[list[dict]]:
    """The search settings the self-check measures on the full index, in groups (see index_select.settings_ladder).

    A selected index measures its family's ladder, each group stopping once the
    target is met; an index set by the options measures the whole nprobe ladder
    (IVF), an efSearch ladder (HNSW) or its one exact setting.
    """
    nlist = params.nlist or 1
    if selected and params.family:
        cand = index_select.Candidate(params.factory, params.family, params.bytes_per_vector,
                                      params.estimated_bytes, True, nlist=params.nlist)
        return index_select.settings_ladder(cand)
    if params.kind == "ivfpq":
        return [[{"nprobe": p} for p in sorted({min(p, nlist) for p in config.nprobes})]]
    if params.kind == "hnsw":
        return [[{"efSearch": ef} for ef in index_select.EF_SEARCH]]
    return [[{}]]


class _CheckRecall(beam.DoFn):
    """Opens every shard as the serving loader does, compares it with exact search, merges if asked."""

    def __init__(self, config: IndexConfig, index_dir: str, run_dir: str, recall_info: dict | None = None):
        self._config, self._dir, self._run_dir = config, index_dir, run_dir
        self._recall_info = recall_info

    def _rel(self, path: str) -> str:
        return path[len(self._run_dir) + 1:]

    def process(self, _, trained: TrainedIndex, shards: list[ShardResult]):
        c, params = self._config, trained.params
        start = time.perf_counter()
        shards = sorted(shards, key=lambda s: s.shard)
        indexes = [indexing.from_bytes(read_bytes(s.index_path)) for s in shards]
        sharded = indexing.ShardedIndex(indexes, params.metric)
        table, rq_table, recommended, reached = [], [], None, False
        nq = len(trained.queries)
        all_q = trained.all_queries
        if len(all_q) and sharded.ntotal:
            own = np.max([s.query_faiss_ids for s in shards], axis=0)
            _, truth = indexing.merge_topk([(s.exact_scores, s.exact_ids) for s in shards], c.k + 1, params.metric)
            truth = indexing.drop_self(truth, own, c.k)
            selected = bool(trained.candidates)
            for group in self_check_settings(params, c, selected):
                for setting in group:
                    rows = []
                    if nq:
                        rows += indexing.recall_table(sharded, trained.queries, truth[:nq], c.k, exclude=own[:nq],
                                                      settings=[setting])
                    if len(all_q) > nq:
                        rows += indexing.recall_table(sharded, all_q[nq:], truth[nq:], c.k, settings=[setting],
                                                      query_set="recall_queries")
                    table += [r for r in rows if r["query_set"] == "held_out"]
                    rq_table += [r for r in rows if r["query_set"] == "recall_queries"]
                    key = recall_key(c.k)
                    if selected and (min(r[key] for r in rows) >= c.target_recall
                                     or max(r["ms_per_query"] for r in rows) > c.max_query_ms):
                        break  # costlier settings of this group add nothing to the choice
            recommended, reached = indexing.recommend_setting(table + rq_table, c.target_recall, c.k, c.max_query_ms)
        self_check_s = time.perf_counter() - start
        files = [trained.path] + [p for s in shards for p in (s.index_path, s.ids_path)]
        merged, merge_note = None, None
        if c.merge:
            try:
                data = indexing.to_bytes(indexing.merge_shards(trained.index_bytes, indexes))
            except RuntimeError as e:  # faiss merges IVF and flat indexes, not HNSW graphs or IndexRefine
                merge_note = f"{params.factory} cannot be merged by faiss ({str(e).strip().splitlines()[-1][:200]})"
                log.warning("index: no merged index: %s", merge_note)
            else:
                merged = f"{self._dir}/{MERGED}"
                write_bytes_atomically(merged, data)
                files.append(merged)
        recommended = recommended or {}
        yield {
            **params.to_json(),
            "ntotal": sharded.ntotal,
            "id_layout": {"row_bits": indexing.ROW_BITS, "faiss_id": "shard << row_bits | row"},
            "score": "inner product" if params.metric == "ip" else "negative squared L2 distance",
            "trained": self._rel(trained.path),
            "shards": [{"shard": s.shard, "index": self._rel(s.index_path), "ids": self._rel(s.ids_path),
                        "count": s.count, "embeddings": [self._rel(f) if f.startswith(self._run_dir + "/") else f
                                                         for f in s.files]} for s in shards],
            # embeddings files grouped into index shards of at most this many vectors (one per file at most)
            "shard_vectors": c.shard_vectors,
            "merged": self._rel(merged) if merged else None,
            "merge_note": merge_note,
            "training": {"vectors": trained.train_vectors, "seconds": round(trained.train_s, 3),
                         "decision_seconds": round(trained.decide_s, 3),
                         "selection_seconds": round(trained.selection_s, 3)},
            "quantizer": trained.quantizer,
            "add_seconds": round(sum(s.add_s for s in shards), 3),
            # rows the shards held before their adds: the selection's winner, measured on the training rows
            "rows_from_selection": sum(s.from_selection for s in shards),
            # the build's other phases (summed over shards): where the time goes besides training and adds
            "phase_seconds": {"sample_ids": round(trained.sample_ids_s, 3),
                              "sample_read": round(trained.sample_read_s, 3),
                              "fill_read": round(sum(s.read_s for s in shards), 3),
                              "fill_write": round(sum(s.write_s for s in shards), 3)},
            "self_check_seconds": round(self_check_s, 3),
            # the self-check's exact ground truth, computed per shard in the fill step (summed over shards)
            "ground_truth_seconds": round(sum(s.truth_s for s in shards), 3),
            "search_params": recommended,
            "candidates": list(trained.candidates),
            "chosen": {**(trained.chosen or {}), "params": recommended},
            "max_query_ms": c.max_query_ms,
            "recall": {
                "k": c.k, "queries": nq, "held_out": trained.held_out,
                "recall_queries": len(all_q) - nq,
                "recall_queries_file": self._recall_info,
                "ground_truth": "exact search over every indexed vector, the query's own item excluded",
                "target_recall": c.target_recall, "recommended_nprobe": recommended.get("nprobe"),
                "recommended_params": recommended, "target_reached": reached,
                "table": table, "recall_queries_table": rq_table,
            },
            "files": files,
        }


class BuildIndex(beam.PTransform):
    """Embeddings file paths -> one dict describing the index (for the manifest), after every file is written.

    ``previous`` (the run incremental reuse compares with) offers its trained
    quantizer to this run when it is comparable (same model fingerprint,
    layout and dtype); ``model_fingerprint`` is this run's, recorded so the
    next run can compare.
    """

    def __init__(self, config: IndexConfig, run_dir: str, dim: int, previous: PreviousRun | None = None,
                 model_fingerprint: str = "", recall_queries: RecallQueries | None = None):
        super().__init__()
        self._recall_queries = recall_queries.vectors if recall_queries is not None else None
        self._recall_info = recall_queries.info if recall_queries is not None else None
        self._config, self._run_dir, self._dim = config, run_dir.rstrip("/"), dim
        self._index_dir = f"{self._run_dir}/index"
        self._fp = model_fingerprint
        self._previous, self._unavailable = self._previous_quantizer(config, previous)

    @staticmethod
    def _previous_quantizer(config: IndexConfig, previous: PreviousRun | None
                            ) -> tuple[PreviousQuantizer | None, str]:
        """Read at graph construction, like the previous run itself: (what it recorded, or why nothing)."""

        if config.reuse_quantizer == "never":
            return None, ""
        if previous is None:
            return None, "no previous run (first run, or --previous_run none)"
        if not previous.reusable:
            return None, f"previous run {previous.run_id} is not comparable: {previous.reason}"
        recorded = PreviousQuantizer.from_manifest(previous.run_dir, read_manifest(previous.run_dir))
        return recorded, "" if recorded else f"previous run {previous.run_id} built no index"

    def expand(self, embedding_files):
        c, p = self._config, embedding_files.pipeline
        size = c.train_size + c.num_queries
        sample = (
            embedding_files
            | "SampleFiles" >> beam.ParDo(_SampleFile(size))
            # no default-value injection (two more stages): an empty catalog's sample is the side input's default
            | "Sample" >> beam.CombineGlobally(SmallestKeys(size)).without_defaults()
        )
        trained = (
            p
            | "Once" >> beam.Create([None])
            | "Train" >> beam.ParDo(_Train(c, self._index_dir, self._dim, self._previous, self._unavailable, self._fp,
                                           self._run_dir.rpartition("/")[2], self._recall_queries),
                                    beam.pvalue.AsSingleton(sample, default_value=None))
        )
        trained_side = beam.pvalue.AsSingleton(trained)
        filled = (
            embedding_files  # the files of index shards the train step did not fill (several shards)
            | "IndexShardOf" >> beam.FlatMap(lambda path, t: [] if t.filled else [(t.index_shard_of(path), path)],
                                             trained_side)
            | "GroupFiles" >> beam.GroupByKey()  # also spreads the index shards over workers
            | "FillShards" >> beam.ParDo(_FillShard(self._index_dir, c.k), trained_side)
        )
        by_train = trained | "FilledByTrain" >> beam.FlatMap(lambda t: [t.shard] if t.shard is not None else [])
        shards = (filled, by_train) | "AllShards" >> beam.Flatten()
        return (
            p
            | "OnceMore" >> beam.Create([None])
            | "CheckRecall" >> beam.ParDo(_CheckRecall(c, self._index_dir, self._run_dir, self._recall_info),
                                          trained_side,
                                          beam.pvalue.AsList(shards))
        )
