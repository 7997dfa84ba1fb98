"""FAISS index building over numpy arrays: no Beam here, so tests, notebooks and
the serving side call the same functions the pipeline's thin DoFns call.

The flow (faiss ``contrib/ondisk`` in spirit): choose parameters from N, the
dimension and a memory budget; train one IVF-PQ index on a sample; serialize
it empty; every shard deserializes that same trained index and adds its own
vectors with collision-free int64 ids, so shards share one coarse quantizer
and one set of PQ codebooks and can be searched together or merged.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import BinaryIO, Sequence

import faiss
import numpy as np
import pyarrow as pa

from pipeline.index.defaults import DEFAULT_NPROBES
from schemas.manifest import IndexParamFields, recall_key

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
# faiss's k-means warns below 39 training points per centroid; below that the centroids are noise
MIN_POINTS_PER_CENTROID = 39
MIN_NBITS, MAX_NBITS = 4, 8
# faiss id = shard << ROW_BITS | row: 2^40 rows per shard, 2^23 shards, always a positive int64
ROW_BITS = 40
MAX_SHARD = (1 << (63 - ROW_BITS)) - 1
FLAT_FACTORY = "IDMap,Flat"
IDS_SCHEMA = pa.schema([pa.field("faiss_id", pa.int64(), nullable=False),
                        pa.field("item_id", pa.string(), nullable=False)])


class IndexParamsError(ValueError):
    """Index parameters that cannot work for this data (the message names the valid choices)."""


@dataclasses.dataclass(frozen=True)
class IndexParams(IndexParamFields):
    """What kind of index to build, and why (``note``): factory, metric, dim, kind, then the rest.

    The fields are the manifest's (``schemas.manifest.IndexParamFields``), so
    ``to_json`` is the parameters part of the manifest's ``index`` as it is.
    """

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def _flat(dim: int, metric: str, n: int, note: str) -> IndexParams:
    return IndexParams(FLAT_FACTORY, metric, dim, "flat", bytes_per_vector=4 * dim + 8,
                       estimated_bytes=n * (4 * dim + 8), note=note)


def _ivfpq_bytes(n: int, dim: int, nlist: int, m: int, nbits: int, opq: bool) -> tuple[float, int]:
    """Bytes per vector (code + 8-byte id in the inverted list) and the index's estimated total."""
    per_vector = math.ceil(m * nbits / 8) + 8
    overhead = 4 * (nlist * dim + (1 << nbits) * dim + (dim * dim if opq else 0))
    return per_vector, n * per_vector + overhead


def choose_params(n: int, dim: int, n_train: int, *, metric: str = "ip", memory_gb: float = 4.0,
                  factory: str = "", nlist: int = 0, m: int = 0, nbits: int = 0, opq: bool = False) -> IndexParams:
    """IVF-PQ parameters from the vector count, dimension and a memory budget (autofaiss-like).

    ``n`` vectors will be indexed, ``n_train`` are available to train on. Any of
    ``factory`` or ``nlist``/``m``/``nbits``/``opq`` overrides the automatic choice.
    Too few training vectors for IVF-PQ gives an exact flat index and says why in
    ``note`` rather than failing the run.
    """
    if metric not in METRICS:
        raise IndexParamsError(f"metric {metric!r} is not one of {sorted(METRICS)}")
    if factory:
        found = [int(t[3:]) for t in factory.replace("_", ",").split(",") if t.startswith("IVF") and t[3:].isdigit()]
        if not found:
            return IndexParams(factory, metric, dim, "hnsw" if "HNSW" in factory else "flat",
                               note="user factory string (not IVF)")
        if n_train < found[0]:
            return _flat(dim, metric, n, f"{n_train} training vectors cannot train {factory!r} "
                                         f"(IVF{found[0]} needs at least {found[0]}): using an exact flat index")
        return IndexParams(factory, metric, dim, "ivfpq", nlist=found[0], note="user factory string")

    if not 0 <= nbits <= 16:
        raise IndexParamsError(f"nbits must be in 1..16 (0: automatic), got {nbits}")
    explicit = bool(nlist or m or nbits)
    enough = MIN_POINTS_PER_CENTROID << MIN_NBITS
    if not explicit and n_train < enough:
        return _flat(dim, metric, n, f"{n_train} training vectors are too few to train IVF-PQ (needs at least "
                                     f"{enough}): using an exact flat index")
    if nbits:
        chosen_nbits = nbits
    elif n_train >= enough:
        chosen_nbits = min(MAX_NBITS, int(math.log2(n_train / MIN_POINTS_PER_CENTROID)))
    else:  # explicit nlist/M on a small sample: the most codebook centroids k-means can still place
        chosen_nbits = max(1, min(MAX_NBITS, int(math.log2(max(n_train, 2)))))
    if nlist:
        chosen_nlist = nlist
    else:
        target = 1 << round(math.log2(4 * math.sqrt(max(n, 1))))  # the power of 2 nearest 4*sqrt(n)
        chosen_nlist = max(1, min(target, _pow2_floor(n_train / MIN_POINTS_PER_CENTROID)))
    needed = max(chosen_nlist, 1 << chosen_nbits)
    if n_train < needed:  # faiss's k-means refuses fewer points than centroids
        return _flat(dim, metric, n, f"{n_train} training vectors cannot train IVF{chosen_nlist} with "
                                     f"{chosen_nbits}-bit PQ (needs at least {needed}): using an exact flat index")

    divisors = [d for d in range(1, dim + 1) if dim % d == 0]
    if m:
        if dim % m:
            raise IndexParamsError(f"PQ M={m} must divide the dimension {dim}; valid: {divisors}")
        chosen_m, note = m, ""
    else:
        upper = min(64, max(1, dim // 2))
        budget = memory_gb * (1 << 30)
        candidates = [d for d in divisors if d <= upper][::-1]
        fitting = [d for d in candidates if _ivfpq_bytes(n, dim, chosen_nlist, d, chosen_nbits, opq)[1] <= budget]
        chosen_m = fitting[0] if fitting else candidates[-1]
        note = "" if fitting else f"over the memory budget of {memory_gb} GB even with M={chosen_m}"
    per_vector, total = _ivfpq_bytes(n, dim, chosen_nlist, chosen_m, chosen_nbits, opq)
    prefix = f"OPQ{chosen_m}," if opq else ""
    # "np": no polysemous code reordering, which costs half the training time and is unused by IVF search
    return IndexParams(f"{prefix}IVF{chosen_nlist},PQ{chosen_m}x{chosen_nbits}np", metric, dim, "ivfpq",
                       nlist=chosen_nlist, m=chosen_m, nbits=chosen_nbits, opq=opq,
                       bytes_per_vector=per_vector, estimated_bytes=total, note=note)


def new_index(factory: str, dim: int, metric: str) -> faiss.Index:
    """An empty index from a factory string that takes ``add_with_ids``.

    IVF indexes keep ids in their lists; anything else (flat, HNSW, an IVF
    behind ``IndexRefine``) is wrapped in an ``IndexIDMap`` unless the factory
    string already starts with ``IDMap``.
    """
    index = faiss.index_factory(dim, factory, METRICS[metric])
    if not _takes_ids(index):
        index = faiss.IndexIDMap(index)
    return index


def _takes_ids(index: faiss.Index) -> bool:
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexIVF)):
        return True
    if isinstance(index, faiss.IndexPreTransform):
        return _takes_ids(index.index)
    return False


def params_for_factory(factory: str, metric: str, dim: int, n: int, family: str = "") -> IndexParams:
    """IndexParams describing an existing factory string (a reused index): nlist, M and nbits read from it."""
    tokens = factory.replace("_", ",").split(",")
    nlist = next((int(t[3:]) for t in tokens if t.startswith("IVF") and t[3:].isdigit()), 0)
    m = nbits = 0
    for t in tokens:
        if t.startswith("PQ") and "x" in t:
            head, _, tail = t[2:].partition("x")
            if head.isdigit():
                m, nbits = int(head), int("".join(ch for ch in tail if ch.isdigit()) or 8)
    kind = "ivfpq" if nlist else ("hnsw" if "HNSW" in factory else "flat")
    return IndexParams(factory, metric, dim, kind, nlist=nlist, m=m, nbits=nbits, opq=factory.startswith("OPQ"),
                       family=family, note="reused from the previous run")


def train_index(params: IndexParams, sample: np.ndarray) -> faiss.Index:
    """An empty index trained on ``sample`` (float32 [s, dim]); faiss's k-means is seeded, so reruns agree."""
    index = new_index(params.factory, params.dim, params.metric)
    if not index.is_trained:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index


def to_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def write_index(index: faiss.Index, stream: BinaryIO) -> None:
    """The index's bytes (``to_bytes``'s) written to ``stream`` in 1 MB pieces as faiss produces them: no
    whole-index buffer, nor the copy of it (two of them at 77 MB for 200k x 384 SQ8, 2x its pages touched)."""
    faiss.write_index(index, faiss.PyCallbackIOWriter(stream.write))  # unbuffered: each piece goes out as written


def from_bytes(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def make_ids(shard: int, n: int) -> np.ndarray:
    """Collision-free faiss ids for ``n`` rows of ``shard``: shard in the high bits, row in the low."""
    if not 0 <= shard <= MAX_SHARD:
        raise ValueError(f"shard number {shard} outside 0..{MAX_SHARD}")
    if n > (1 << ROW_BITS):
        raise ValueError(f"{n} rows do not fit the {ROW_BITS}-bit row field of a faiss id")
    return (np.int64(shard) << np.int64(ROW_BITS)) | np.arange(n, dtype=np.int64)


def split_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """faiss ids -> (shard, row); -1 (no result) stays -1 in both."""
    ids = np.asarray(ids, dtype=np.int64)
    valid = ids >= 0
    shard = np.where(valid, ids >> ROW_BITS, -1)
    row = np.where(valid, ids & ((1 << ROW_BITS) - 1), -1)
    return shard, row


def fill_shard(trained: faiss.Index | bytes, vectors: np.ndarray, shard: int) -> tuple[faiss.Index, np.ndarray]:
    """A copy of the trained index holding ``vectors`` under ids ``make_ids(shard, len(vectors))``."""
    index = from_bytes(trained if isinstance(trained, bytes) else to_bytes(trained))
    ids = make_ids(shard, len(vectors))
    if len(vectors):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
    return index, ids


# rows gathered per add when some rows of a part are held already: one buffer of this many rows is reused, so
# completing a 1M x 512 shard copies 128 MB at a time instead of allocating (and faulting in) 1.8 GB
ADD_CHUNK_ROWS = 1 << 16


def add_parts(index: faiss.Index, parts: Sequence[np.ndarray], ids: np.ndarray,
              held: np.ndarray | None = None) -> None:
    """Adds the rows of ``parts`` (one shard's files, in order) under ``ids`` (one per row of their
    concatenation), except the rows at positions ``held``, which ``index`` holds already.

    The parts are never concatenated: a part with no held row is added as it is, the others' remaining rows
    are gathered in chunks into one reused buffer. Rows are added in row order either way, so the lists come
    out as one ``add_with_ids`` of the remaining rows would leave them.
    """
    keep = None
    if held is not None and len(held):
        keep = np.ones(len(ids), bool)
        keep[np.asarray(held, np.int64)] = False
    buffer: np.ndarray | None = None
    offset = 0
    for part in parts:
        n = len(part)
        part_ids = ids[offset:offset + n]
        rows = None if keep is None else np.flatnonzero(keep[offset:offset + n])
        offset += n
        if rows is None or len(rows) == n:  # no row of this part is held: added as it is
            if n:
                index.add_with_ids(np.ascontiguousarray(part, dtype=np.float32), part_ids)
            continue
        if not len(rows):
            continue  # the index holds every row of this part already
        part = np.asarray(part, dtype=np.float32)
        size = min(ADD_CHUNK_ROWS, len(rows))
        if buffer is None or buffer.shape[1] != part.shape[1] or len(buffer) < size:
            buffer = np.empty((size, part.shape[1]), np.float32)
        for at in range(0, len(rows), len(buffer)):
            chunk = rows[at:at + len(buffer)]
            np.take(part, chunk, axis=0, out=buffer[:len(chunk)])
            index.add_with_ids(buffer[:len(chunk)], part_ids[chunk])


def index_shard_count(n: int, files: int, shard_vectors: int) -> int:
    """How many index shards ``n`` vectors in ``files`` embeddings files are filled into: one per
    ``shard_vectors`` vectors, at most one per file, at least one.

    Every index shard file carries its own copy of the trained fixed part (coarse
    centroids, codebooks, OPQ matrix): a small catalog in one shard holds it once,
    which leaves a tight memory budget to the codes.
    """
    return max(1, min(max(files, 1), math.ceil(max(n, 0) / max(shard_vectors, 1))))


def index_shard_of(file_shard: int, files: int, index_shards: int) -> int:
    """The index shard that embeddings file ``file_shard`` of ``files`` goes to (contiguous runs of files)."""
    return min(file_shard * index_shards // max(files, 1), index_shards - 1)


def ids_table(faiss_ids: np.ndarray, item_ids: Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.Table:
    """faiss id -> item id; ``item_ids`` as Python strings or as the Arrow column they were read as."""
    if isinstance(item_ids, pa.ChunkedArray):
        item_ids = item_ids.combine_chunks()
    column = item_ids.cast(pa.string()) if isinstance(item_ids, pa.Array) else pa.array(list(item_ids), pa.string())
    return pa.table({"faiss_id": pa.array(faiss_ids, pa.int64()), "item_id": column}, schema=IDS_SCHEMA)


def worst_score(metric: str) -> float:
    """What faiss reports for a missing result (-FLT_MAX for IP, +FLT_MAX for L2)."""
    big = float(np.finfo(np.float32).max)
    return -big if metric == "ip" else big


def exact_topk(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int, metric: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of ``queries`` among ``vectors`` (labelled ``ids``): the ground truth."""
    nq = len(queries)
    if len(vectors) == 0 or nq == 0:
        return np.full((nq, k), worst_score(metric), np.float32), np.full((nq, k), -1, np.int64)
    # faiss.knn scans the array in place: an IndexFlat would copy every vector first (2 GB at 1M x 512). It
    # takes its BLAS path only above distance_compute_blas_threshold (128000 in faiss 1.15: 250 queries of 384
    # dims stay below it and took 0.73 s over 100k rows, against 0.18 s through BLAS), so BLAS is asked for here.
    # The setting is process-wide; it is put back, and a search that overlaps in another thread only runs slower.
    before = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 0
    try:
        scores, rows = faiss.knn(np.ascontiguousarray(queries, dtype=np.float32),
                                 np.ascontiguousarray(vectors, dtype=np.float32), k, metric=METRICS[metric])
    finally:
        faiss.cvar.distance_compute_blas_threshold = before
    return scores, np.where(rows >= 0, np.asarray(ids, np.int64)[np.maximum(rows, 0)], -1)


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-shard top-k results -> global top-k; ties broken by id so the result is deterministic."""
    if not parts:
        raise ValueError("nothing to merge")
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    primary = -scores if metric == "ip" else scores
    order = np.lexsort((ids, primary), axis=-1)[:, :k]
    out_s, out_i = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    if out_s.shape[1] < k:  # fewer candidates than k across all shards
        pad = k - out_s.shape[1]
        out_s = np.pad(out_s, ((0, 0), (0, pad)), constant_values=worst_score(metric))
        out_i = np.pad(out_i, ((0, 0), (0, pad)), constant_values=-1)
    return out_s, out_i


# search parameter -> faiss ParameterSpace name (it reaches through IDMap, OPQ and IndexRefine wrappers)
SEARCH_PARAMS = {"nprobe": "nprobe", "k_factor": "k_factor_rf", "efSearch": "efSearch"}


def apply_search_params(index: faiss.Index, params: dict | None) -> None:
    """Sets nprobe (capped at nlist), k_factor and efSearch on ``index``; unknown names are an error."""
    space = faiss.ParameterSpace()
    for name, value in (params or {}).items():
        if name not in SEARCH_PARAMS:
            raise ValueError(f"search parameter {name!r} is not one of {sorted(SEARCH_PARAMS)}")
        if value is None:
            continue
        if name == "nprobe":
            value = min(int(value), max(nlist_of(index), 1))
        space.set_index_parameter(index, SEARCH_PARAMS[name], float(value) if name == "k_factor" else int(value))


def is_ivf(index: faiss.Index) -> bool:
    return faiss.try_extract_index_ivf(index) is not None


def nlist_of(index: faiss.Index) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    return 0 if ivf is None else ivf.nlist


class ShardedIndex:
    """Index shards that share one trained quantizer, searched together.

    Each shard is searched with the same nprobe and the per-shard top-k lists
    are merged, which is exactly what one index holding all vectors returns
    (same codes, same distances), without ever building that index.
    """

    def __init__(self, shards: Sequence[faiss.Index], metric: str):
        if not shards:
            raise ValueError("a sharded index needs at least one shard")
        self.shards, self.metric = list(shards), metric
        self.ivf = is_ivf(self.shards[0])
        self.nlist = nlist_of(self.shards[0])

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.shards)

    def set_nprobe(self, nprobe: int) -> None:
        if self.ivf:
            self.set_params({"nprobe": nprobe})

    def set_params(self, params: dict | None) -> None:
        """Search parameters (nprobe, k_factor, efSearch) on every shard; those that do not apply are an error."""
        for shard in self.shards:
            apply_search_params(shard, params)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None, params: dict | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, faiss ids) [n, k]; missing results have id -1. ``params`` or ``nprobe`` are set first."""
        if params:
            self.set_params(params)
        if nprobe is not None:
            self.set_nprobe(nprobe)
        xq = np.ascontiguousarray(queries, dtype=np.float32)
        parts = [s.search(xq, k) for s in self.shards if s.ntotal]
        if not parts:
            return np.full((len(xq), k), worst_score(self.metric), np.float32), np.full((len(xq), k), -1, np.int64)
        return merge_topk(parts, k, self.metric)


def merge_shards(trained: faiss.Index | bytes, shards: Sequence[faiss.Index]) -> faiss.Index:
    """One index holding every shard's vectors (ids kept), built by ``merge_from`` into the trained index."""
    merged = from_bytes(trained if isinstance(trained, bytes) else to_bytes(trained))
    for shard in shards:
        merged.merge_from(from_bytes(to_bytes(shard)), 0)  # merge_from empties its argument: merge a copy
    return merged


def drop_self(ids: np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
    """Each row's first ``k`` ids without that row's ``exclude`` id (a query that is itself indexed)."""
    out = np.full((len(ids), k), -1, np.int64)
    for i, (row, own) in enumerate(zip(ids, exclude)):
        kept = row[row != own][:k] if own >= 0 else row[:k]
        out[i, :len(kept)] = kept
    return out


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """k-recall@k: the mean share of the true top-k found in the returned top-k."""
    total = 0.0
    for got, want in zip(found[:, :k], truth[:, :k]):
        want = want[want >= 0]
        if len(want):
            total += len(np.intersect1d(got[got >= 0], want)) / len(want)
    return total / max(len(found), 1)


def one_recall_at_one(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(found[:, 0] == truth[:, 0])) if len(found) else 0.0


def recall_table(index: ShardedIndex, queries: np.ndarray, truth: np.ndarray, k: int = 10,
                 nprobes: Sequence[int] = DEFAULT_NPROBES, single_queries: int = 50,
                 exclude: np.ndarray | None = None, settings: Sequence[dict] | None = None,
                 query_set: str = "held_out") -> list[dict]:
    """Recall of the sharded index against exact ground truth for each search setting, with latency.

    ``settings`` (dicts of nprobe / k_factor / efSearch) default to the
    ``nprobes`` ladder for IVF and one exact row (``nprobe`` None) otherwise.
    ``ms_per_query`` is a batched search of all queries divided by their
    number; ``single_query_ms_p50`` is the median of one-query searches (what
    a serving call sees). ``exclude`` (per query: its own faiss id, or -1)
    drops a query that is itself indexed from its results, as it must be from
    ``truth``: otherwise 1-recall@1 only measures whether a vector finds itself.
    """
    if settings is None:
        settings = [{"nprobe": p} for p in sorted({min(p, index.nlist) for p in nprobes})] if index.ivf else [{}]
    rows = []
    for params in settings:
        index.set_params(params)
        start = time.perf_counter()
        _, found = index.search(queries, k + (exclude is not None))
        if exclude is not None:
            found = drop_self(found, exclude, k)
        batch_ms = (time.perf_counter() - start) * 1000 / max(len(queries), 1)
        singles = []
        for q in queries[:single_queries]:
            start = time.perf_counter()
            index.search(q[None, :], k)
            singles.append((time.perf_counter() - start) * 1000)
        rows.append({
            "params": dict(params),
            "query_set": query_set,
            "nprobe": params.get("nprobe"),
            recall_key(k): round(recall_at(found, truth, k), 4),
            "recall_1_at_1": round(one_recall_at_one(found, truth), 4),
            "ms_per_query": round(batch_ms, 4),
            "single_query_ms_p50": round(float(np.median(singles)), 4) if singles else None,
        })
    return rows


def recommend_setting(table: list[dict], target: float, k: int = 10, max_query_ms: float = math.inf
                      ) -> tuple[dict | None, bool]:
    """The fastest setting whose k-recall@k reaches ``target`` on every query set of ``table`` within
    ``max_query_ms`` (batched) (and True), else the most accurate one within the cap, else overall (and False)."""
    key = recall_key(k)
    if not table:
        return None, False
    groups: dict[str, list[dict]] = {}
    for row in table:
        groups.setdefault(repr(sorted((row.get("params") or {"nprobe": row.get("nprobe")}).items())), []).append(row)
    scored = []
    for rows in groups.values():
        params = rows[0].get("params")
        if params is None:
            params = {"nprobe": rows[0].get("nprobe")} if rows[0].get("nprobe") is not None else {}
        recall, ms = min(r[key] for r in rows), max(r["ms_per_query"] for r in rows)
        scored.append((params, recall, ms))
    meeting = [s for s in scored if s[1] >= target and s[2] <= max_query_ms]
    if meeting:
        return min(meeting, key=lambda s: s[2])[0], True
    within = [s for s in scored if s[2] <= max_query_ms] or scored
    return max(within, key=lambda s: (s[1], -s[2]))[0], False


def recommend_nprobe(table: list[dict], target: float, k: int = 10) -> tuple[int | None, bool]:
    """The smallest nprobe whose k-recall@k reaches ``target`` (and True), else the best one (and False)."""
    key = recall_key(k)
    if not table:
        return None, False
    for row in table:
        if row[key] >= target:
            return row["nprobe"], True
    best = max(table, key=lambda r: (r[key], -(r["nprobe"] or 0)))
    return best["nprobe"], False
