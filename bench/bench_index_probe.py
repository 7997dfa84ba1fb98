"""The PQ probe's settings against its decision: cost and recall ceiling, and the full candidate's ceiling.

The selection probes a plain IVF-PQ candidate on a small sub-sample before training it in full
(pipeline/index/index_select.py, ``_pq_probe_says_skip``); a ceiling more than PROBE_MARGIN below the
target skips it. This script runs that very function with round 5's settings (16 points per codeword,
8 k-means iterations, 1,000 queries) and round 7's (the module's constants), on 100,000 training rows of
each benchmark set with 1,000 held-out queries, then trains the full candidate and scans every list: both
probes must reject it the same way. Prints the figures and replaces its section of docs/BENCHMARKS.md.

    flock /tmp/bench.lock python bench/bench_index_probe.py
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench._report import report  # noqa: E402
from index_data import clustered, minilm_vectors  # noqa: E402
from pipeline.index import index_select, indexing  # noqa: E402

HEADING = "Index selection: the PQ probe's settings against the full candidate (issue 12, round 7)"
K, TARGET, TRAIN = 10, 0.95, 100_000
SETTINGS = {"round 5 (16 points/codeword, 8 iterations, 1,000 queries)": (16, 8, 1000),
            "round 7 (8 points/codeword, 4 iterations, 250 queries)": (index_select.PROBE_TRAIN_PER_CODE,
                                                                       index_select.PROBE_NITER,
                                                                       index_select.PROBE_QUERIES)}


def data_sets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(training rows, held-out queries) per set: a seeded random 101,000 rows, the first 1,000 as queries."""
    items, _, _ = minilm_vectors(200_000)
    pick = np.random.default_rng(0).permutation(len(items))[:TRAIN + 1000]
    minilm = np.ascontiguousarray(items[pick], np.float32)
    synthetic = clustered(TRAIN + 1000, 512, seed=3)
    return {name: (x[1000:], x[:1000]) for name, x in (("MiniLM man pages", minilm), ("synthetic clustered", synthetic))}


def main() -> None:
    saved = (index_select.PROBE_TRAIN_PER_CODE, index_select.PROBE_NITER, index_select.PROBE_QUERIES)
    rows = []
    for name, (train, queries) in data_sets().items():
        dim = train.shape[1]
        plan = index_select.plan(2 * TRAIN, dim, TRAIN, 4.0)[0]
        cand = next(c for c in plan if c.family == "ivf_pq")
        sets = [index_select.QuerySet("held_out", queries, database=train, k=K)]
        for label, (per_code, niter, nq) in SETTINGS.items():
            index_select.PROBE_TRAIN_PER_CODE, index_select.PROBE_NITER, index_select.PROBE_QUERIES = per_code, niter, nq
            entry: dict = {}
            why = index_select._pq_probe_says_skip(cand, entry, plan, dim, "ip", train, sets, TARGET, K, print)
            probe = entry["probe"]
            rows.append((name, f"probe, {label}", probe["recall_at_10"]["held_out"], probe["seconds"],
                         "skips the full candidate" if why else "trains the full candidate"))
        index_select.PROBE_TRAIN_PER_CODE, index_select.PROBE_NITER, index_select.PROBE_QUERIES = saved
        start = time.perf_counter()
        centroids = index_select._trained_quantizer(cand.nlist, dim, "ip", train)
        full = index_select.train_candidate(cand, dim, "ip", train, centroids)
        full.add_with_ids(train, np.arange(len(train), dtype=np.int64))
        seconds = time.perf_counter() - start
        indexing.apply_search_params(full, {"nprobe": cand.nlist})
        ceiling = indexing.recall_at(full.search(queries, K)[1], sets[0].exact_ids(len(queries)), K)
        rows.append((name, f"full `{cand.name}` on {TRAIN:,} rows, every list scanned", round(ceiling, 4),
                     round(seconds, 1), "misses the target" if ceiling < TARGET else "meets the target"))
        print(rows[-3:], flush=True)
    lines = [f"`flock /tmp/bench.lock python bench/bench_index_probe.py` on this machine ({os.cpu_count()} CPU cores, "
             f"faiss-cpu), one run, side by side. {TRAIN:,} training rows and 1,000 held-out queries per set (MiniLM: "
             "a seeded random draw of the 200,000 cached all-MiniLM-L6-v2 vectors; synthetic: 101,000 clustered 512-d "
             "vectors from bench/index_data.py's generator, seed 3). The probe is index_select._pq_probe_says_skip "
             f"itself (IVF-PQ of the candidate's code on its first {index_select.PROBE_ROWS:,} rows, nlist scaled "
             f"down, every list scanned); it skips the full candidate below target {TARGET} - margin "
             f"{index_select.PROBE_MARGIN}. The full candidate's seconds include its coarse quantizer, training and "
             "fill.", "", "| data | run | 10-recall@10 (every list) | seconds | decision |", "|---|---|---|---|---|"]
    lines += [f"| {d} | {r} | {rec} | {s} | {why} |" for d, r, rec, s, why in rows]
    report(HEADING, "\n".join(lines))


if __name__ == "__main__":
    main()
