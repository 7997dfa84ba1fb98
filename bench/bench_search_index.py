"""Benchmark of the query side: `search`/`eval` through the run's IVF-PQ index against exact search.

Synthetic catalog: N x D clustered unit vectors (seeded), split into 4 index
shards that share one trained IVF-PQ (``pipeline.index.indexing``, parameters chosen
as the pipeline chooses them), wrapped in ``pipeline.index.runs.Run`` exactly as
``open_run`` builds it. Queries are noisy copies of catalog vectors. For the
exact searcher (``ExactSearcher``, what `search` used before) and the index
searcher (``IndexSearcher``) at several nprobe values it measures, in one run:
median latency of a batch of queries (eval's path) and of single queries
(`search`'s path), and 10-recall@10 / top-1 agreement against exact search.
Prints the figures and replaces its own section of docs/BENCHMARKS.md.

    python bench/bench_search_index.py [--n 100000] [--dim 128] [--queries 200] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._report import median_seconds, replace_section  # noqa: E402
from pipeline.index import indexing  # noqa: E402
from pipeline.index.runs import Run  # noqa: E402
from pipeline.query.search import ExactSearcher, IndexSearcher  # noqa: E402

HEADING = "Search through the index vs exact search (search/eval integration)"
SHARDS = 4


def _data(n: int, dim: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(n // 200, 16), dim)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(n, queries, replace=False)] + 0.3 * rng.normal(size=(queries, dim)).astype(np.float32) / np.sqrt(dim) * 4
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q.astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--train", type=int, default=20_000, help="vectors to train the index on")
    args = ap.parse_args()

    x, q = _data(args.n, args.dim, args.queries)
    ids = [f"item-{i}" for i in range(args.n)]
    rng = np.random.default_rng(1)
    train = x[rng.choice(args.n, min(args.n, args.train), replace=False)]
    params = indexing.choose_params(args.n, args.dim, len(train))
    t = time.perf_counter()
    trained = indexing.train_index(params, train)
    parts = np.array_split(np.arange(args.n), SHARDS)
    shards = [indexing.fill_shard(trained, x[p], s)[0] for s, p in enumerate(parts)]
    build_s = time.perf_counter() - t
    item_ids = {s: np.array([ids[i] for i in p], dtype=object) for s, p in enumerate(parts)}
    manifest = {"index": {"metric": params.metric, "factory": params.factory, "dim": args.dim,
                          "recall": {"recommended_nprobe": None}}}
    run = Run("bench", manifest, indexing.ShardedIndex(shards, params.metric), item_ids)

    exact = ExactSearcher(ids, x)
    _, truth = exact.search(q, 10)
    rows = []
    batch = median_seconds(lambda: exact.search(q, 10), args.repeats)
    single = median_seconds(lambda: [exact.search(v[None], 10) for v in q[:20]], args.repeats) / 20
    rows.append(("exact (ExactSearcher)", batch, single, 1.0, 1.0))
    for nprobe in (1, 4, 16, 64):
        if nprobe > params.nlist:
            break
        searcher = IndexSearcher(run, "cosine", nprobe)
        _, found = searcher.search(q, 10)
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))
        top1 = float(np.mean([bool(a) and a[0] == b[0] for a, b in zip(found, truth)]))
        batch = median_seconds(lambda: searcher.search(q, 10), args.repeats)
        single = median_seconds(lambda: [searcher.search(v[None], 10) for v in q[:20]], args.repeats) / 20
        rows.append((f"index {params.factory}, nprobe {nprobe}", batch, single, recall, top1))

    exact_single = rows[0][2]
    lines = [
        f"Synthetic {args.n:,} x {args.dim} clustered unit vectors, {SHARDS} index shards, {args.queries} queries "
        f"(noisy copies of items); index `{params.factory}` (ip) built in {build_s:.1f} s; "
        f"medians of {args.repeats} repeats, one run, 2-core CPU shared with other jobs (noisy). "
        f"`python bench/bench_search_index.py --n {args.n} --dim {args.dim} --train {args.train}`",
        "",
        "| searcher | batch of queries, ms/query | single query, ms | vs exact (single) | 10-recall@10 | top-1 = exact |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, batch, single, recall, top1 in rows:
        lines.append(f"| {name} | {1000 * batch / args.queries:.3f} | {1000 * single:.2f} | "
                     f"{exact_single / single:.1f}x | {recall:.3f} | {top1:.3f} |")
    lines += ["", "Exact search also has to hold every float32 vector in memory "
              f"({args.n * args.dim * 4 / 2**20:.0f} MiB here); the index holds "
              f"{params.bytes_per_vector:g} bytes a vector. `search` and `eval` use the index by default, "
              "with the manifest's recommended nprobe; `--exact` gives the exact row."]
    body = "\n".join(lines)
    print(body)
    replace_section(HEADING, body)


if __name__ == "__main__":
    main()
