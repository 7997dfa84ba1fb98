"""PQ code shapes under a tight memory budget, one index shard, on the cached 200k MiniLM vectors (issue 12).

Why the index selection keeps 8-bit PQ codes: each FACTORY@POINTS argument is
trained (POINTS: PQ training points per codeword; OPQ on POINTS x 256 rows,
25 iterations) on a seeded 50,000-row sample, filled with all 200,000
vectors and searched with the 1,000 query sentences against exact truth at
nprobe 32..512. Prints one row per factory and writes its section.

    flock /tmp/bench.lock python bench/index_codes.py "IVF1024,PQ96x6np@256" "OPQ64,IVF1024,PQ64x8np@64"
"""
from __future__ import annotations

import os
import sys
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._report import report  # noqa: E402
from bench.index_data import minilm_vectors  # noqa: E402

HEADING = "Index codes under a tight budget: PQ shapes, one index shard, 200k MiniLM (issue 12)"
NPROBES = (32, 64, 128, 256, 512, 1024, 2048)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / truth.shape[1] for f, t in zip(found, truth)]))


def measure(factory: str, points: int, xb: np.ndarray, xq: np.ndarray, truth: np.ndarray, train: np.ndarray) -> str:
    index = faiss.index_factory(xb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    faiss.downcast_index(faiss.extract_index_ivf(index)).pq.cp.max_points_per_centroid = points
    if isinstance(index, faiss.IndexPreTransform):
        opq = faiss.downcast_VectorTransform(index.chain.at(0))
        opq.max_train_points, opq.niter = points * 256, 25
    start = time.perf_counter()
    index.train(train)
    train_s = time.perf_counter() - start
    index.add(xb)
    cells = []
    for nprobe in NPROBES:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        start = time.perf_counter()
        found = index.search(xq, truth.shape[1])[1]
        cells.append(f"{recall(found, truth):.3f} / {(time.perf_counter() - start) * 1000 / len(xq):.2f}")
    size = len(faiss.serialize_index(index)) / len(xb)
    return f"| `{factory}` | {points} | {size:.1f} | {train_s:.0f} | 1 | " + " | ".join(cells) + " |"


def main() -> None:
    specs = [a.rsplit("@", 1) for a in sys.argv[1:]] or [["OPQ64,IVF1024,PQ64x8np", "64"]]
    xb, xq, _ = minilm_vectors(200_000)
    xb, xq = np.ascontiguousarray(xb, np.float32), np.ascontiguousarray(xq, np.float32)
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    truth = flat.search(xq, 10)[1]
    train = xb[np.random.default_rng(0).choice(len(xb), 50_000, replace=False)]
    rows = []
    for factory, points in specs:
        rows.append(measure(factory, int(points), xb, xq, truth, train))
        print(rows[-1], flush=True)
    body = "\n".join([
        f"`flock /tmp/bench.lock python bench/index_codes.py {' '.join(sys.argv[1:])}` on this machine "
        f"({os.cpu_count()} CPU cores, faiss-cpu): one index shard of 200,000 MiniLM vectors, trained on a seeded "
        "50,000-row sample; 10-recall@10 / batched ms per query of the 1,000 query sentences against exact search.",
        "", "| factory | train points per codeword | B/vector | train s | run | " + " | ".join(f"nprobe {p}" for p in NPROBES)
        + " |", "|---|---|---|---|---|" + "---|" * len(NPROBES), *rows])
    report(HEADING, body)


if __name__ == "__main__":
    main()
