"""Exact top-k search over a run's embeddings Parquet (the reference the FAISS index is checked against).

A searcher has one method, ``search(queries [n, d] float32, k) -> (scores [n, k'],
ids)``, with ``k' = min(k, number of items)``; the index loader offers the same.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow.parquet as pq

from schemas.embeddings import vectors_of

METRICS = ("cosine", "l2")


class ExactSearcher:
    """Brute force over all item vectors held in memory.

    ``cosine``: scores are inner products (vectors are unit, so cosines),
    highest first. ``l2``: scores are squared Euclidean distances, lowest
    first; for unit vectors ``|q - x|^2 = 2 - 2 cos``, so the order is the
    same and only the numbers differ.
    """

    def __init__(self, ids: Sequence[str], vectors: np.ndarray, metric: str = "cosine"):
        if metric not in METRICS:
            raise ValueError(f"metric {metric!r} is not one of {METRICS}")
        vectors = np.ascontiguousarray(vectors, np.float32)
        if vectors.ndim != 2 or len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for vectors of shape {vectors.shape}")
        self.ids, self.vectors, self.metric = list(ids), vectors, metric
        self._sq_norms = np.einsum("ij,ij->i", vectors, vectors)

    @classmethod
    def from_files(cls, files: Sequence[str], metric: str = "cosine") -> "ExactSearcher":
        from apache_beam.io.filesystems import FileSystems

        ids, parts = [], []
        for path in files:
            with FileSystems.open(path, compression_type="uncompressed") as f:
                table = pq.read_table(f, columns=["item_id", "vector"])
            ids += table.column("item_id").to_pylist()
            parts.append(vectors_of(table))
        return cls(ids, np.concatenate(parts) if parts else np.zeros((0, 0), np.float32), metric)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dim {queries.shape[1]}, the items {self.dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k, len(self.ids))
        ip = queries @ self.vectors.T
        if self.metric == "cosine":
            keyed = -ip
        else:
            keyed = np.einsum("ij,ij->i", queries, queries)[:, None] + self._sq_norms[None, :] - 2 * ip
            keyed = np.maximum(keyed, 0)
        top = np.argpartition(keyed, k - 1, axis=1)[:, :k] if k < len(self.ids) else np.tile(
            np.arange(len(self.ids)), (len(queries), 1))
        rows = np.arange(len(queries))[:, None]
        # ties broken by position, so equal scores give a stable order
        order = np.lexsort((top, keyed[rows, top]), axis=1)
        top = top[rows, order]
        scores = keyed[rows, top]
        scores = -scores if self.metric == "cosine" else scores
        return scores.astype(np.float32), [[self.ids[j] for j in row] for row in top]
