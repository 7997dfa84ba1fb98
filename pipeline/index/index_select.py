"""Choose the index by measurement within a memory budget (no Beam here).

The flow, autofaiss-like but measured rather than formula-picked:

1. ``plan``: every candidate family (exact flat fp32/fp16, HNSW, IVF with SQ8
   or fp16 codes, IVF-PQ, IVF-PQ with OPQ, IVF-PQ with a refinement stage over
   SQ8/fp16/flat copies) gets a factory string sized to this catalog, and its
   memory for all ``n`` vectors is estimated *before anything is built* (the
   preflight): a candidate over the budget is recorded with a reason and never
   trained.
2. ``select``: the fitting candidates are trained on the deterministic sample
   in order of memory, cheapest first; each fills its trained copy with the
   training rows and is searched with the held-out queries (and the run's own
   recall queries, when given) over a ladder of search settings (nprobe,
   k_factor, efSearch), against exact ground truth on the same rows.
3. The winner is the cheapest candidate (memory first, then latency) that
   reaches the target recall at some setting whose batched latency, scaled to
   the whole catalog, is within ``max_query_ms``. Once a candidate wins, the
   costlier ones cannot, so they are recorded as not measured. Every IVF
   candidate shares one coarse quantizer, trained once (for OPQ, its rotation
   of the same centroids: an orthogonal map keeps distances).

The winner's trained, empty index is the one the shards are filled from: the
selection's training is the build's training, not an extra pass.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import faiss
import numpy as np

from pipeline.index import indexing
from pipeline.index.quantizer_reuse import REUSABLE_FAMILIES as REUSABLE

MIN_POINTS_PER_LIST = 39  # faiss's k-means warns below 39 training points per centroid
MAX_POINTS_PER_LIST = 256  # faiss samples at most 256 points per centroid for k-means
HNSW_M = 32
EF_SEARCH = (16, 32, 64, 128, 256, 512)
K_FACTORS = (1, 2, 4, 8, 16, 32)
SINGLE_QUERIES = 20
# a setting is measured on this many queries per set; an estimate of 10-recall@10 within CONFIDENCE_Z standard
# errors of the target decides nothing (the ladder goes on; measure_staged): at 250 queries and a recall near
# 0.95 one standard error is about 0.005, so a setting 0.015 clear of the target is decided on a quarter of them
QUERY_STEP = 250
CONFIDENCE_Z = 3.0
CODEBOOK_POINTS_PER_CENTROID = 64
# PQ codebook training is one k-means per sub-quantizer: past 64 of them it dominates a CPU build (faiss-cpu
# without AVX2 here: PQ128x8 took 105 s on 10k vectors); more accuracy comes from SQ8 or refinement instead
MAX_PQ_M = 64
OPQ_NITER = 25  # faiss's default is 50; the rotation's gain flattens well before
OPQ_MAX_GAIN = 0.10  # recall an OPQ rotation is assumed unable to add over plain PQ of the same code size
# the PQ probe: a PQ candidate's recall ceiling (every list scanned) measured on a small sub-sample, so that a
# candidate far below the target is not trained in full when a costlier family may meet it (the full PQ64x8
# training was 17.6 of a 23.5 s selection on 200k MiniLM vectors, for a candidate that reached 0.78)
PROBE_ROWS = 8192  # database rows of the probe (the first rows of the deterministic sample)
# PQ training points per codeword in the probe (faiss's full default is 256) and k-means iterations of its codebooks
# (faiss's default is 25): the probe's 64 small k-means were most of its cost. bench/bench_index_probe.py, 100k rows
# of both benchmark sets: 16 points / 8 iterations / 1,000 queries read 0.773 (MiniLM) and 0.801 (synthetic) in
# 1.68 / 1.28 s, 8 points / 4 iterations / 250 queries 0.768 and 0.811 in 0.71 / 0.44 s, the full IVF2048,PQ64x8np
# 0.782 / 0.838: all far below the 0.85 that would train the candidate, so the choice is the same
PROBE_TRAIN_PER_CODE = 8
PROBE_NITER = 4
PROBE_QUERIES = QUERY_STEP  # per query set: the probe reads a ceiling with a 0.10 margin, 250 queries suffice
PROBE_MARGIN = 0.10  # a probe ceiling this far below the target skips the full candidate
# the coarse centroids (stored once per index shard) may take at most this share of the budget: under a tight
# budget nlist is halved until they do, leaving the bytes to the codes
MAX_FIXED_SHARE = 0.20
MIN_NLIST = 16
# a tight budget's PQ sizing (size_pq): OPQ's M in steps of 8 (8-byte aligned codes, as faiss's usual shapes), at
# least 4 dimensions per sub-quantizer, lists shrunk in steps of 64 when that frees the bytes for a larger M
PQ_M_STEP = 8
MIN_SUB_DIMS = 4
NLIST_STEP = 64
MAX_DROPPED = 1 / 8  # the share of dimensions an OPQ rotation below the input dimension may drop
FAMILIES = ("flat", "flat_fp16", "hnsw", "ivf_sq8", "ivf_fp16", "ivf_pq", "ivf_pq_opq", "ivf_pq_refine")
# the families whose trained quantizer a later run may reuse: the IVF ones (flat and HNSW train nothing)
REUSABLE_FAMILIES = REUSABLE


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One index family sized to the catalog, and its memory estimate (the preflight)."""

    name: str  # faiss factory string
    family: str
    bytes_per_vector: float
    memory_bytes: int  # estimated for the whole catalog
    fits_budget: bool
    nlist: int = 0
    m: int = 0
    nbits: int = 0
    d_out: int = 0  # the PQ's dimension (OPQ's output); 0: the vectors' own
    skipped_reason: str | None = None

    @property
    def ivf(self) -> bool:
        return self.family.startswith("ivf")

    def params(self, metric: str, dim: int, note: str = "") -> indexing.IndexParams:
        kind = "ivfpq" if self.ivf else ("hnsw" if self.family == "hnsw" else "flat")
        return indexing.IndexParams(self.name, metric, dim, kind, nlist=self.nlist, m=self.m, nbits=self.nbits,
                                    opq=self.family == "ivf_pq_opq", bytes_per_vector=self.bytes_per_vector,
                                    estimated_bytes=self.memory_bytes, note=note, family=self.family)


def choose_nlist(n: int, n_train: int) -> tuple[int, str]:
    """IVF lists by faiss's guidance (4*sqrt(N) .. 16*sqrt(N) below 1M vectors, 2^16 for 1M-10M, 2^18 above),
    capped so that each list gets at least 39 training points; 0 when the sample cannot train IVF at all."""
    if n < 1_000_000:
        target = 1 << round(math.log2(4 * math.sqrt(max(n, 1))))
    else:
        target = 1 << (16 if n < 10_000_000 else 18)
    cap = n_train // MIN_POINTS_PER_LIST
    if cap < 4:
        return 0, f"{n_train} training vectors are too few to train an IVF index (needs at least {4 * MIN_POINTS_PER_LIST})"
    chosen = min(target, 1 << int(math.log2(cap)))
    note = "" if chosen == target else (f"nlist {chosen} instead of faiss's guideline {target}: {n_train} training "
                                         f"vectors give at least {MIN_POINTS_PER_LIST} per list")
    return chosen, note


def _nlist_within_share(nlist: int, dim: int, shards: int, budget: float) -> tuple[int, str]:
    """``nlist`` halved (not below MIN_NLIST) until ``shards`` copies of the coarse centroids and list sizes
    are at most MAX_FIXED_SHARE of ``budget``; (nlist, note)."""
    chosen = nlist
    while chosen > MIN_NLIST and shards * (4 * dim + 8) * chosen > MAX_FIXED_SHARE * budget:
        chosen //= 2
    if chosen == nlist:
        return nlist, ""
    return chosen, (f"nlist {chosen} instead of {nlist}: {shards} index shard(s) of coarse centroids kept within "
                    f"{MAX_FIXED_SHARE:.0%} of the memory budget")


def _pq_m(dim: int, max_code_bytes: float, min_dims: int = 4) -> int:
    """The most PQ sub-quantizers (dividing ``dim``, >= ``min_dims`` dimensions each, at most MAX_PQ_M)
    within ``max_code_bytes``."""
    fitting = [d for d in range(1, min(dim, MAX_PQ_M) + 1)
               if dim % d == 0 and dim // d >= min_dims and d <= max_code_bytes]
    return max(fitting) if fitting else 0


@dataclasses.dataclass(frozen=True)
class PQShape:
    """An IVF-PQ layout sized to the budget: lists, sub-quantizers, bits, and OPQ's output dimension."""

    nlist: int
    m: int
    nbits: int
    d_out: int  # the PQ's (and the centroids') dimension: OPQ's output, or ``dim`` without OPQ

    def factory(self, dim: int, opq: bool) -> str:
        rotation = (f"OPQ{self.m}," if self.d_out == dim else f"OPQ{self.m}_{self.d_out},") if opq else ""
        return f"{rotation}IVF{self.nlist},PQ{self.m}x{self.nbits}np"


def pq_fixed_bytes(dim: int, shape: PQShape, opq: bool) -> int:
    """One index shard's fixed part: the centroids (in the rotated space), every list's size in the file,
    the codebooks, and the OPQ matrix (``d_out`` x ``dim``)."""
    coarse = 4 * shape.nlist * shape.d_out + 8 * shape.nlist
    books = 4 * (1 << shape.nbits) * shape.d_out
    return coarse + books + (4 * dim * shape.d_out if opq else 0)


def _pq_bytes(n: int, dim: int, shape: PQShape, opq: bool, shards: int) -> tuple[int, int]:
    """(bytes per vector: code + 8-byte id, total for ``n`` vectors in ``shards`` index shards)."""
    per_vector = math.ceil(shape.m * shape.nbits / 8) + 8
    return per_vector, n * per_vector + shards * pq_fixed_bytes(dim, shape, opq)


def _d_outs(dim: int, m: int) -> list[int]:
    """OPQ output dimensions for ``m`` sub-quantizers, in the order tried, at least MIN_SUB_DIMS dimensions per
    sub-quantizer: the multiple of ``m`` just below ``dim`` (dropping the rotation's least-variance directions,
    at most MAX_DROPPED of them), then the one above. Measured on 200k MiniLM (docs/BENCHMARKS.md): OPQ72_360
    gains 0.014 over OPQ64 at 100 B/vector, while padding above ``dim`` buys nothing (OPQ64_448 = OPQ64)."""
    above, below = -(-dim // m) * m, dim // m * m
    tried = ([below] if below >= dim * (1 - MAX_DROPPED) else []) + [above]
    return [d for d in dict.fromkeys(tried) if d // m >= MIN_SUB_DIMS]


def size_pq(n: int, dim: int, budget: float, shards: int, nlist: int, min_nlist: int, nbits: int, opq: bool,
            max_m: int, reshape: bool | None = None) -> PQShape | None:
    """The largest PQ that fits ``budget``: the most sub-quantizers (``nbits``-bit codes), then the most lists.

    M divides ``dim`` (at least MIN_SUB_DIMS dimensions each) unless ``reshape``
    (default: ``opq``): then M is a multiple of PQ_M_STEP and OPQ's output
    dimension a multiple of M near ``dim`` (``_d_outs``). ``nlist`` may shrink from
    the given one down to ``min_nlist`` (faiss's 4*sqrt(N) lower end) to free bytes
    for codes, in steps of NLIST_STEP. None when no M fits.
    """
    reshape = opq if reshape is None else reshape and opq
    if reshape:
        ms = [m for m in range(max_m, 0, -1) if m % PQ_M_STEP == 0 or m < PQ_M_STEP]
    else:
        ms = [m for m in range(min(max_m, dim // MIN_SUB_DIMS), 0, -1) if dim % m == 0]
    for m in ms:
        for d_out in (_d_outs(dim, m) if reshape else [dim]):
            if not d_out:
                continue
            shape = PQShape(nlist, m, nbits, d_out)
            per_vector, total = _pq_bytes(n, dim, shape, opq, shards)
            if total <= budget:
                return shape
            # the most lists (>= min_nlist) that leave room for this code
            room = (budget - n * per_vector) / shards - pq_fixed_bytes(dim, PQShape(0, m, nbits, d_out), opq)
            fit = int(room // (4 * d_out + 8)) // NLIST_STEP * NLIST_STEP
            if fit >= max(min_nlist, 1) and fit < nlist:
                return PQShape(fit, m, nbits, d_out)
    return None


def min_nlist(n: int, nlist: int) -> int:
    """The fewest lists a tight budget may shrink ``nlist`` to: faiss's 4*sqrt(N) below 1M vectors (rounded
    up to NLIST_STEP), never below MIN_NLIST, and ``nlist`` itself when that is already fewer."""
    lower = -(-math.ceil(4 * math.sqrt(max(n, 1))) // NLIST_STEP) * NLIST_STEP if n < 1_000_000 else nlist
    return min(nlist, max(lower, MIN_NLIST))


def plan(n: int, dim: int, n_train: int, memory_gb: float, metric: str = "ip", shards: int = 1
         ) -> tuple[list[Candidate], str]:
    """Every candidate family sized to ``n`` vectors of ``dim`` in ``shards`` index shards, memory estimated,
    in memory order.

    The estimate is per vector (codes, ids, links) times ``n`` plus the fixed part
    (coarse centroids, list sizes, codebooks, OPQ matrix) times ``shards``: every
    shard file carries its own copy. Candidates over the budget are kept
    (``fits_budget`` False, with the reason) so the manifest shows what was ruled
    out before anything was built. Returns (candidates, note).
    """
    budget = memory_gb * (1 << 30)
    shards = max(int(shards), 1)
    id_bytes = 8  # every vector's int64 id, in an IVF list or an IndexIDMap
    out: list[tuple[str, str, float, int, dict]] = []  # (name, family, per vector, fixed overhead, extra)

    out.append(("IDMap,Flat", "flat", 4 * dim + id_bytes, 0, {}))
    out.append(("IDMap,SQfp16", "flat_fp16", 2 * dim + id_bytes, 0, {}))
    # HNSW: the vector, about 2*M links on level 0 plus the upper levels' few, level bookkeeping, the id
    out.append((f"IDMap,HNSW{HNSW_M}", "hnsw", 4 * dim + 4 * (2 * HNSW_M + 2) + 16 + id_bytes, 0, {}))

    nlist, note = choose_nlist(n, n_train)
    nbits = min(8, int(math.log2(max(n_train // MIN_POINTS_PER_LIST, 1))))
    nlist, shrunk = _nlist_within_share(nlist, dim, shards, budget)
    note = "; ".join(x for x in (note, shrunk) if x)
    if nlist:
        coarse = 4 * nlist * dim + 8 * nlist  # the centroids, and every inverted list's size in the file
        out.append((f"IVF{nlist},SQ8", "ivf_sq8", dim + id_bytes, coarse + 8 * dim, {"nlist": nlist}))
        out.append((f"IVF{nlist},SQfp16", "ivf_fp16", 2 * dim + id_bytes, coarse, {"nlist": nlist}))
        if nbits >= 4:
            # IVF-PQ sized to the budget: while SQ8 fits, the costlier families reach higher recall for less
            # training, so PQ keeps today's shape (at most MAX_PQ_M sub-quantizers over the chosen lists); when
            # nothing but PQ fits, the whole budget goes to the codes (size_pq: the largest M, OPQ's output
            # dimension a multiple of it, lists shrunk within faiss's guidance when that frees the bytes).
            # Narrower codes over more sub-quantizers were measured and lose: on 200k MiniLM at 100 B/vector,
            # PQ96x6 reached 0.789 (OPQ 0.793) against OPQ64 with PQ64x8's 0.818, at 4x the scan time
            sq8_fits = n * (dim + id_bytes) + shards * (coarse + 8 * dim) <= budget
            max_m = MAX_PQ_M if sq8_fits else dim
            low = nlist if sq8_fits else min_nlist(n, nlist)
            for family, opq in (("ivf_pq", False), ("ivf_pq_opq", True)):
                shape = size_pq(n, dim, budget, shards, nlist, low, nbits, opq, max_m, reshape=not sq8_fits)
                if shape is None and not sq8_fits:  # nothing fits: today's shape, recorded as over the budget
                    shape = size_pq(n, dim, math.inf, shards, nlist, nlist, nbits, opq, MAX_PQ_M, reshape=False)
                if shape is None:
                    continue
                out.append((shape.factory(dim, opq), family, _pq_bytes(n, dim, shape, opq, shards)[0],
                            pq_fixed_bytes(dim, shape, opq),
                            {"nlist": shape.nlist, "m": shape.m, "nbits": shape.nbits, "d_out": shape.d_out}))
            # refinement: a coarse PQ (8 dimensions per code) finds k * k_factor candidates, a finer copy reranks
            codebooks = 4 * (1 << nbits) * dim
            m_base = _pq_m(dim, dim / 8 * 8 / nbits, min_dims=8) or _pq_m(dim, math.inf)
            if m_base:
                code = math.ceil(m_base * nbits / 8)
                for refine, size in (("Refine(SQ8)", dim), ("Refine(SQfp16)", 2 * dim), ("RFlat", 4 * dim)):
                    # IVF list id + the IDMap's id (IndexRefine cannot take ids itself)
                    out.append((f"IDMap,IVF{nlist},PQ{m_base}x{nbits}np,{refine}", "ivf_pq_refine",
                                code + 2 * id_bytes + size, coarse + codebooks + (8 * dim if "SQ8" in refine else 0),
                                {"nlist": nlist, "m": m_base, "nbits": nbits}))
    cands = []
    for name, family, per_vector, fixed, extra in out:
        total = int(n * per_vector + shards * fixed)
        fits = total <= budget
        reason = None if fits else f"over the memory budget: {total / (1 << 30):.3g} GB > {memory_gb:g} GB"
        cands.append(Candidate(name, family, float(per_vector), total, fits, skipped_reason=reason, **extra))
    cands.sort(key=lambda c: (c.memory_bytes, FAMILIES.index(c.family)))
    return cands, note


def nprobe_ladder(nlist: int) -> list[int]:
    """The default nprobes, continued by doubling up to every list: a group stops at the target or the latency
    cap, so a tight budget's PQ codes may scan as many lists as the cap allows (autofaiss tunes to it too)."""
    top = max(indexing.DEFAULT_NPROBES)
    more = [top << i for i in range(1, max(nlist.bit_length(), 1)) if top << i < nlist]
    return sorted({min(p, nlist) for p in (*indexing.DEFAULT_NPROBES, *more, nlist)})


def settings_ladder(candidate: Candidate) -> list[list[dict]]:
    """Search settings to try, as groups: within a group, cost grows, so a group stops once one setting
    reaches the target (or the latency cap)."""
    if candidate.family == "hnsw":
        return [[{"efSearch": ef} for ef in EF_SEARCH]]
    if not candidate.ivf:
        return [[{}]]
    nprobes = nprobe_ladder(candidate.nlist)
    if candidate.family == "ivf_pq_refine":
        return [[{"nprobe": p, "k_factor": kf} for p in nprobes] for kf in K_FACTORS]
    return [[{"nprobe": p} for p in nprobes]]


@dataclasses.dataclass
class QuerySet:
    """Queries and their exact top-k over the measured rows (ids are row numbers of the database).

    ``truth`` may be left out and ``database`` given instead: the exact top-k is then
    computed on first use, for as many leading queries as a measurement asks
    (``head``), so a setting decided on the first QUERY_STEP queries never pays for
    the rest's ground truth.
    """

    name: str  # "held_out" | "recall_queries"
    queries: np.ndarray
    truth: np.ndarray | None = None
    database: np.ndarray | None = None
    metric: str = "ip"
    k: int = 10

    def exact_ids(self, q: int) -> np.ndarray:
        """The exact top-k ids of the first ``q`` queries (computed once per query, on demand)."""
        known = 0 if self.truth is None else len(self.truth)
        if known < q:
            if self.database is None:
                raise ValueError(f"query set {self.name!r} has ground truth for {known} queries, {q} asked")
            rows = np.arange(len(self.database), dtype=np.int64)
            more = indexing.exact_topk(self.database, rows, self.queries[known:q], self.k, self.metric)[1]
            self.truth = more if self.truth is None else np.concatenate([self.truth, more])
        assert self.truth is not None
        return self.truth[:q]

    def head(self, q: int) -> "QuerySet":
        """The first ``q`` queries (all of them when there are no more), their truth computed now."""
        if q >= len(self.queries):
            return self
        return QuerySet(self.name, self.queries[:q], self.exact_ids(q), metric=self.metric, k=self.k)


def measure(index: indexing.ShardedIndex, sets: Sequence[QuerySet], params: dict, k: int,
            single_queries: int = SINGLE_QUERIES, db_ids: np.ndarray | None = None) -> list[dict]:
    """One setting's recall and latency on every query set (rows of the manifest's ``settings``), with how many
    queries it was measured on and the standard error of its 10-recall@10 (per-query recalls' spread).
    ``db_ids``: the faiss id of each database row, when the index holds them under other ids than row numbers."""
    rows = []
    for qs in sets:
        index.set_params(params)
        truth = qs.exact_ids(len(qs.queries))
        if db_ids is not None:
            truth = np.where(truth >= 0, db_ids[np.maximum(truth, 0)], -1)
        start = time.perf_counter()
        _, found = index.search(qs.queries, k)
        batch_ms = (time.perf_counter() - start) * 1000 / max(len(qs.queries), 1)
        singles = []
        for q in qs.queries[:single_queries]:
            start = time.perf_counter()
            index.search(q[None, :], k)
            singles.append((time.perf_counter() - start) * 1000)
        per_query = _per_query_recall(found, truth, k)
        se = float(per_query.std(ddof=1) / math.sqrt(len(per_query))) if len(per_query) > 1 else math.inf
        rows.append({"params": dict(params), "query_set": qs.name,
                     "recall_at_10": round(float(per_query.mean()) if len(per_query) else 0.0, 4),
                     "recall_at_1": round(indexing.one_recall_at_one(found, truth), 4),
                     "queries": len(qs.queries), "recall_se": round(se, 4) if math.isfinite(se) else None,
                     "ms_per_query_batch": round(batch_ms, 4),
                     "ms_single_p50": round(float(np.median(singles)), 4) if singles else None})
    return rows


def _per_query_recall(found: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """Each query's share of its true top-k found in its returned top-k (indexing.recall_at's terms)."""
    out = np.zeros(len(found))
    for i, (got, want) in enumerate(zip(found[:, :k], truth[:, :k])):
        want = want[want >= 0]
        out[i] = len(np.intersect1d(got[got >= 0], want)) / len(want) if len(want) else 0.0
    return out


def measure_staged(index: indexing.ShardedIndex, sets: Sequence[QuerySet], params: dict, k: int, target: float,
                   step: int = 0, full: bool = False, db_ids: np.ndarray | None = None) -> list[dict]:
    """``measure`` on the first ``step`` (QUERY_STEP) queries of each set (all of them when ``full``).

    Each row says whether it is ``confident``: measured on every query, or clear of
    ``target`` by more than CONFIDENCE_Z standard errors. The ladder goes on past an
    unconfident setting (a costlier one decides), and re-measures one on every query
    only when no confident setting decides the candidate (``select``).
    """
    step = step or QUERY_STEP
    if full or all(len(qs.queries) <= step for qs in sets):
        return [{**r, "confident": True} for r in measure(index, sets, params, k, db_ids=db_ids)]
    rows = measure(index, [qs.head(step) for qs in sets], params, k, db_ids=db_ids)
    return [{**r, "confident": r["recall_se"] is not None
             and abs(r["recall_at_10"] - target) > CONFIDENCE_Z * r["recall_se"]} for r in rows]


def _ladder(index: indexing.ShardedIndex, cand: Candidate, sets: Sequence[QuerySet], k: int, target: float,
            max_query_ms: float, scale: float, db_ids: np.ndarray) -> list[dict]:
    """Every measured row of ``cand``'s settings ladder: a group stops at a setting that confidently meets the
    target, or at the latency cap; if no setting confidently meets it within the cap, the unconfident ones
    within the cap are measured again on every query."""
    rows_all: list[dict] = []
    for group in settings_ladder(cand):
        for params in group:
            rows = measure_staged(index, sets, params, k, target, db_ids=db_ids)
            rows_all += rows
            recall = min(r["recall_at_10"] for r in rows)
            ms = max(r["ms_per_query_batch"] for r in rows) * scale
            if (recall >= target and all(r["confident"] for r in rows)) or ms > max_query_ms:
                break  # costlier settings of this group: no better choice, or over the cap
    if _best_setting(rows_all, target, max_query_ms, scale)[1]:
        return rows_all
    unsure = [r["params"] for r in rows_all if not r["confident"] and r["ms_per_query_batch"] * scale <= max_query_ms]
    for params in [p for i, p in enumerate(unsure) if p not in unsure[:i]]:
        rows_all = [r for r in rows_all if r["params"] != params] + measure_staged(index, sets, params, k, target,
                                                                                full=True, db_ids=db_ids)
    return rows_all


def _scale(candidate: Candidate, n: int, n_db: int) -> float:
    """How a search's time on ``n_db`` rows grows to ``n``: linearly for scans (flat, IVF lists), about
    logarithmically for HNSW's graph walk."""
    ratio = max(1.0, n / max(n_db, 1))
    return 1 + math.log(ratio) / math.log(max(n_db, 2)) if candidate.family == "hnsw" else ratio


def _trained_quantizer(nlist: int, dim: int, metric: str, train: np.ndarray) -> np.ndarray:
    """The coarse centroids every IVF candidate shares, trained the way a factory's IVF trains them."""
    ivf = faiss.index_factory(dim, f"IVF{nlist},Flat", indexing.METRICS[metric])
    ivf.train(train)
    return faiss.extract_index_ivf(ivf).quantizer.reconstruct_n(0, nlist)


def train_candidate(candidate: Candidate, dim: int, metric: str, train: np.ndarray,
                    centroids: np.ndarray | None) -> faiss.Index:
    """An empty trained index of ``candidate``; IVF candidates start from the shared ``centroids``."""
    index = indexing.new_index(candidate.name, dim, metric)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:  # before any training: the OPQ rotation below is trained with these caps too
        _cap_codebook_training(index, ivf)
    if ivf is not None and centroids is not None:
        base = faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap) else index)
        if isinstance(base, faiss.IndexPreTransform):  # OPQ: train the rotation, then rotate the centroids
            transform = base.chain.at(0)
            transform.train(train)
            ivf.quantizer.add(transform.apply(centroids))
        else:
            ivf.quantizer.add(centroids)
    if not index.is_trained:
        index.train(train)
    return index


def _cap_codebook_training(index: faiss.Index, ivf: faiss.IndexIVF) -> None:
    """PQ codebooks and OPQ rotations train on at most CODEBOOK_POINTS_PER_CENTROID points per codeword
    (faiss's default is 256): k-means over thousands of 4-dimensional sub-vectors is the costly part of a
    PQ candidate, and 64 points per centroid is within faiss's guidance."""
    ivfpq = faiss.try_extract_index_ivf(index)
    pq = getattr(faiss.downcast_index(ivfpq), "pq", None)
    if pq is not None:
        pq.cp.max_points_per_centroid = CODEBOOK_POINTS_PER_CENTROID
        base = faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap) else index)
        if isinstance(base, faiss.IndexPreTransform):
            opq = faiss.downcast_VectorTransform(base.chain.at(0))
            if isinstance(opq, faiss.OPQMatrix):
                opq.max_train_points = CODEBOOK_POINTS_PER_CENTROID * 256  # a rotation of dim^2 entries
                opq.niter = OPQ_NITER


@dataclasses.dataclass
class Selection:
    """The measured candidates, the winner and its trained empty index."""

    candidates: list[dict]
    chosen: dict
    params: indexing.IndexParams
    index: faiss.Index
    seconds: float  # the whole selection: every candidate's training and measurement
    train_seconds: float  # the winner's own training (shared coarse quantizer included when it is IVF)
    # the winner as measured: its trained index holding the training rows under ``train_ids`` (an index shard
    # holding them may start from it and add only the other rows)
    filled: faiss.Index | None = None


def _best_setting(rows: list[dict], target: float, max_ms: float, scale: float) -> tuple[dict | None, bool]:
    """(the cheapest setting confidently reaching ``target`` on every query set within the latency cap, True),
    else (the most accurate setting within the cap, False); latency is the batched one scaled to the catalog."""
    by_params: dict[str, list[dict]] = {}
    for r in rows:
        by_params.setdefault(repr(sorted(r["params"].items())), []).append(r)
    best, best_key = None, None
    for group in by_params.values():
        recall = min(r["recall_at_10"] for r in group)
        ms = max(r["ms_per_query_batch"] for r in group) * scale
        within = ms <= max_ms
        meets = within and recall >= target and all(r.get("confident", True) for r in group)
        key = (meets, within, -ms if meets else recall, -ms)
        if best_key is None or key > best_key:
            best, best_key = group[0]["params"], key
    return best, bool(best_key and best_key[0])


def select(n: int, dim: int, train: np.ndarray, sets: Sequence[QuerySet], *, metric: str, memory_gb: float,
           target: float, max_query_ms: float, k: int = 10, families: Sequence[str] | None = None,
           shards: int = 1, log: Callable[[str], None] = lambda _: None,
           train_ids: np.ndarray | None = None) -> Selection:
    """Trains and measures candidates in memory order; returns the cheapest that meets the target.

    ``sets`` hold the queries and their exact top-k among ``train``'s rows (the
    measured database). With no candidate meeting the target, the most accurate
    fitting one within the latency cap wins, and ``chosen["why"]`` says so.
    ``shards`` is how many index shards the winner is filled into (the memory
    preflight counts each shard's fixed part). ``train_ids`` (default: row numbers)
    are the ids the measured indexes hold ``train``'s rows under: the winner's
    filled index comes back as ``Selection.filled``.
    """
    start = time.perf_counter()
    plan_rows, note = plan(n, dim, len(train), memory_gb, metric, shards)
    if families is not None:
        plan_rows = [c for c in plan_rows if c.family in families]
    train = np.ascontiguousarray(train, np.float32)
    n_train_ivf = min(len(train), MAX_POINTS_PER_LIST * max((c.nlist for c in plan_rows), default=1))
    ivf_train = train[:n_train_ivf]
    harder = "recall_queries" if any(s.name == "recall_queries" for s in sets) else "held_out"
    centroids, coarse_s = None, 0.0
    ids = np.arange(len(train), dtype=np.int64) if train_ids is None else np.asarray(train_ids, np.int64)
    kept: dict[str, faiss.Index] = {}  # filled indexes of the candidates that may still be chosen
    results: list[tuple[Candidate, dict[str, Any], bytes | None]] = []  # (candidate, entry, empty trained index)
    winner: tuple[Candidate, dict[str, Any], bytes, float] | None = None
    for cand in plan_rows:
        entry: dict[str, Any] = {"name": cand.name, "family": cand.family, "bytes_per_vector": cand.bytes_per_vector,
                 "memory_bytes": cand.memory_bytes, "fits_budget": cand.fits_budget,
                 "skipped_reason": cand.skipped_reason, "train_seconds": 0.0, "settings": [],
                 "best_setting": None, "meets_target": False}
        results.append((cand, entry, None))
        if not cand.fits_budget:
            continue
        if winner is not None and cand.memory_bytes > winner[0].memory_bytes:
            entry["skipped_reason"] = f"not measured: {winner[0].name} uses less memory and meets the target"
            continue
        skip = _opq_not_worth_it(cand, results, plan_rows, target) or _pq_probe_says_skip(
            cand, entry, plan_rows, dim, metric, train, sets, target, k, log)
        if skip:
            entry["skipped_reason"] = skip
            continue
        t0 = time.perf_counter()
        if cand.ivf and centroids is None:
            centroids = _trained_quantizer(cand.nlist, dim, metric, ivf_train)
            coarse_s = time.perf_counter() - t0
            entry["coarse_seconds"] = round(coarse_s, 3)  # shared by every IVF candidate, counted here once
            log(f"index: coarse quantizer IVF{cand.nlist} trained on {len(ivf_train)} vectors in {coarse_s:.1f} s")
            t0 = time.perf_counter()
        index = train_candidate(cand, dim, metric, ivf_train if cand.ivf else train, centroids)
        empty = indexing.to_bytes(index)
        entry["train_seconds"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        filled = indexing.from_bytes(empty)
        filled.add_with_ids(train, ids)
        entry["fill_seconds"] = round(time.perf_counter() - t0, 3)  # add work an index shard starts from
        sharded = indexing.ShardedIndex([filled], metric)
        scale = _scale(cand, n, len(train))
        entry["settings"] = _ladder(sharded, cand, sets, k, target, max_query_ms, scale, ids)
        best, meets = _best_setting(entry["settings"], target, max_query_ms, scale)
        entry.update(best_setting=best, meets_target=meets, latency_scale=round(scale, 3),
                     measure_seconds=round(time.perf_counter() - t0, 3))  # fill, ladder, ground truth as asked
        results[-1] = (cand, entry, empty)
        log(f"index: candidate {cand.name}: {'meets' if meets else 'misses'} the target "
            f"(best setting {best}, trained in {entry['train_seconds']:.1f} s)")
        if meets and (winner is None or _cheaper(entry, winner[1], scale, winner[3])):
            winner = (cand, entry, empty, scale)
        kept[cand.name] = filled
        best_so_far = max((e for _, e, b in results if b is not None), key=_best_recall)["name"]
        kept = {name: f for name, f in kept.items() if name in (best_so_far, winner[0].name if winner else None)}
    why, fallback = "", None
    if winner is None:  # nobody meets the target: the most accurate measured candidate within the cap
        measured = [(c, e, b) for c, e, b in results if b is not None]
        if not measured:
            raise indexing.IndexParamsError(f"no index candidate fits the memory budget of {memory_gb:g} GB "
                                            f"for {n} x {dim} vectors: " + "; ".join(
                                                f"{c.name}: {c.skipped_reason}" for c, _, _ in results))
        fallback = max(measured, key=lambda t: _best_recall(t[1]))
        cand, entry, empty = fallback
        why = (f"no candidate reached 10-recall@10 >= {target} within {max_query_ms:g} ms/query; {cand.name} "
               f"({cand.family}, {cand.bytes_per_vector:.0f} B/vector) reached the most: "
               f"{_best_recall(entry):.3f} at {entry['best_setting']}")
    else:
        cand, entry, empty, _ = winner
        cheaper = [e for c, e, b in results if b is not None and e is not entry]
        why = (f"{cand.name} ({cand.family}, {cand.bytes_per_vector:.0f} B/vector, "
               f"{cand.memory_bytes / (1 << 30):.3g} GB) is the least memory that reaches 10-recall@10 >= {target} "
               f"on the {'recall' if harder == 'recall_queries' else 'held-out'} queries within {max_query_ms:g} ms/query, "
               f"at {entry['best_setting']}"
               + (f"; measured and missed: {', '.join(e['name'] for e in cheaper if not e['meets_target'])}"
                  if any(not e["meets_target"] for e in cheaper) else ""))
    chosen = {"name": cand.name, "family": cand.family, "params": entry["best_setting"] or {}, "why": why,
              "meets_target": entry["meets_target"], "query_set": harder}
    train_s = entry["train_seconds"] + (coarse_s if cand.ivf else 0.0)  # its own training + the shared centroids
    return Selection([e for _, e, _ in results], chosen, cand.params(metric, dim, note),
                     indexing.from_bytes(empty), time.perf_counter() - start, train_s, kept.get(cand.name))


def _pq_probe_says_skip(cand: Candidate, entry: dict, plan_rows: Sequence[Candidate], dim: int, metric: str,
                        train: np.ndarray, sets: Sequence[QuerySet], target: float, k: int,
                        log: Callable[[str], None]) -> str | None:
    """Why a plain IVF-PQ candidate is not trained in full, or None to train it.

    Only when a costlier non-PQ family fits the budget (so skipping cannot leave
    the run without a candidate) and there are more rows than the probe's: its
    ceiling is measured with IVF-PQ of the same code (nlist scaled down with the
    rows, by residual, every list scanned) on the first PROBE_ROWS rows, and
    recorded in ``entry["probe"]``. Its cheap codebooks (PROBE_TRAIN_PER_CODE
    points per codeword, PROBE_NITER iterations) and smaller database put its
    ceiling within 0.03 of the full candidate's on the benchmark sets (MiniLM
    0.768 against 0.782, synthetic 0.811 against 0.838;
    bench/bench_index_probe.py), well inside PROBE_MARGIN.
    """
    if cand.family != "ivf_pq" or len(train) <= 2 * PROBE_ROWS or not sets:
        return None
    if not any(c.fits_budget and c.memory_bytes > cand.memory_bytes and c.family not in ("ivf_pq", "ivf_pq_opq")
               for c in plan_rows):
        return None
    start = time.perf_counter()
    rows = train[:PROBE_ROWS]
    nlist = max(4, 1 << int(math.log2(max(cand.nlist * PROBE_ROWS / len(train), 4))))
    probe = faiss.index_factory(dim, f"IVF{nlist},PQ{cand.m}x{cand.nbits}np", indexing.METRICS[metric])
    pq = faiss.downcast_index(probe).pq
    pq.cp.max_points_per_centroid = PROBE_TRAIN_PER_CODE
    pq.cp.min_points_per_centroid = PROBE_TRAIN_PER_CODE  # few points by design: no k-means warning
    pq.cp.niter = PROBE_NITER
    probe.train(rows[:max(PROBE_TRAIN_PER_CODE << cand.nbits, MIN_POINTS_PER_LIST * nlist)])
    probe.add(rows)
    faiss.downcast_index(probe).nprobe = nlist
    recalls = {}
    for qs in sets:
        queries = qs.queries[:PROBE_QUERIES]
        truth = indexing.exact_topk(rows, np.arange(len(rows), dtype=np.int64), queries, k, metric)[1]
        recalls[qs.name] = round(indexing.recall_at(probe.search(queries, k)[1], truth, k), 4)
    ceiling = min(recalls.values())
    entry["probe"] = {"rows": len(rows), "nlist": nlist, "nprobe": nlist, "recall_at_10": recalls,
                      "queries": min(PROBE_QUERIES, max(len(qs.queries) for qs in sets)),
                      "train_per_codeword": PROBE_TRAIN_PER_CODE, "niter": PROBE_NITER,
                      "seconds": round(time.perf_counter() - start, 3)}
    log(f"index: probe of {cand.name} on {len(rows)} rows: ceiling {ceiling:.3f} "
        f"in {entry['probe']['seconds']:.1f} s")
    if ceiling < target - PROBE_MARGIN:
        return (f"not measured: its probe (IVF{nlist},PQ{cand.m}x{cand.nbits}np on {len(rows)} rows, every list "
                f"scanned) reached {ceiling:.3f}, more than {PROBE_MARGIN} below the target, and costlier "
                f"families fit the budget")
    return None


def _opq_not_worth_it(cand: Candidate, results: list, plan_rows: Sequence[Candidate], target: float) -> str | None:
    """Why an OPQ candidate is not trained (OPQ training costs many times a PQ's), or None to train it.

    Only when its PQ twin (same code size) was measured more than OPQ_MAX_GAIN
    below the target *and* a costlier family that may still meet it fits the
    budget: a rotation rarely buys more than a few points of recall. Without
    such a fallback (a tight budget) OPQ is always measured.
    """
    if cand.family != "ivf_pq_opq":
        return None
    twin = next((e for c, e, b in results if c.family == "ivf_pq" and c.m == cand.m
                 and (b is not None or e.get("probe"))), None)
    if twin is None:
        return None
    twin_recall = _best_recall(twin) if twin["settings"] else min(twin["probe"]["recall_at_10"].values())
    gap = target - twin_recall
    others = [c for c in plan_rows if c.fits_budget and c.memory_bytes > cand.memory_bytes
              and c.family not in ("ivf_pq", "ivf_pq_opq")]
    if gap > OPQ_MAX_GAIN and others:
        return (f"not measured: {twin['name']} (same code size) reached {twin_recall:.3f}, more than "
                f"{OPQ_MAX_GAIN} below the target, and costlier families fit the budget")
    return None


def _best_recall(entry: dict) -> float:
    best = entry["best_setting"]
    rows = [r for r in entry["settings"] if r["params"] == best] or entry["settings"]
    return min((r["recall_at_10"] for r in rows), default=0.0)


def _cheaper(a: dict, b: dict, scale_a: float, scale_b: float) -> bool:
    """Memory first, then the batched latency of the best setting."""
    def ms(e, s):
        return max((r["ms_per_query_batch"] for r in e["settings"] if r["params"] == e["best_setting"]),
                   default=math.inf) * s
    return (a["memory_bytes"], ms(a, scale_a)) < (b["memory_bytes"], ms(b, scale_b))
