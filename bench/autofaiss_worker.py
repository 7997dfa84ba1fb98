"""Runs autofaiss in its own virtual environment (it is not a project dependency) on the benchmark's vectors.

    /tmp/afvenv/bin/python bench/autofaiss_worker.py EMB_DIR QUERIES.npy TRUTH.npy BUDGET_BYTES WORKDIR

Imports only numpy, faiss and autofaiss (that venv pins faiss-cpu 1.9 and
numpy < 2: autofaiss 2.18 fails on OPQ indexes with faiss 1.15). Builds with
the same memory budget, loads the written index as a server would, applies
the search parameters autofaiss tuned (its default cap: 10 ms per query),
and prints one JSON line: its choice, build time, bytes per vector, and
10-recall@10 and latency on the same queries against the same exact truth.
"""
import json
import logging
import os
import sys
import time

import faiss
import numpy as np
from autofaiss import build_index


def main() -> None:
    emb_dir, queries_path, truth_path, budget, workdir = sys.argv[1:6]
    queries, truth = np.load(queries_path), np.load(truth_path)
    n = sum(np.load(os.path.join(emb_dir, f), mmap_mode="r").shape[0] for f in os.listdir(emb_dir))
    index_path, infos_path = os.path.join(workdir, "knn.index"), os.path.join(workdir, "index_infos.json")
    start = time.perf_counter()
    _, infos = build_index(embeddings=emb_dir, index_path=index_path, index_infos_path=infos_path,
                           max_index_memory_usage=f"{int(budget)}B", current_memory_available="16G",
                           metric_type="ip", verbose=logging.WARNING)
    build_s = time.perf_counter() - start
    index = faiss.read_index(index_path)
    faiss.ParameterSpace().set_index_parameters(index, infos["index_param"])
    k = truth.shape[1]
    start = time.perf_counter()
    _, found = index.search(queries, k)
    batch_ms = (time.perf_counter() - start) * 1000 / len(queries)
    singles = []
    for q in queries[:200]:
        start = time.perf_counter()
        index.search(q[None, :], k)
        singles.append((time.perf_counter() - start) * 1000)
    recall = float(np.mean([len(np.intersect1d(f, t)) / k for f, t in zip(found, truth)]))
    print(json.dumps({"factory": infos["index_key"], "params": infos["index_param"], "build_s": build_s,
                      "bytes_per_vector": os.path.getsize(index_path) / n, "recall_at_10": recall,
                      "recall_at_1": float(np.mean(found[:, 0] == truth[:, 0])), "ms_per_query_batch": batch_ms,
                      "ms_single_p50": float(np.median(singles)), "faiss": faiss.__version__}))


if __name__ == "__main__":
    main()
