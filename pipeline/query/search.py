"""Exact top-k search over a run's embeddings Parquet (the reference the FAISS index is checked against).

A searcher has one method, ``search(queries [n, d] float32, k) -> (scores [n, k'],
ids)``, with ``k' = min(k, number of items)``; the index loader offers the same.
"""
from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np

from pipeline.storage import read_table
from schemas.embeddings import vectors_of
from schemas.manifest import Manifest

METRICS = ("cosine", "l2")


def check_nprobe(nprobe: int | None) -> None:
    """The one check of a caller's nprobe (None: the manifest's recommended one); the CLI calls it too."""
    if nprobe is not None and nprobe < 1:
        raise ValueError(f"nprobe must be >= 1, got {nprobe}")


def check_k(k: int) -> None:
    """The one check of how many results a caller asks for; the CLI calls it too."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def check_metric(metric: str) -> None:
    """The one check of a searcher's metric."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {METRICS}")


_Searcher = TypeVar("_Searcher", bound="ExactSearcher")


class ExactSearcher:
    """Brute force over all item vectors held in memory.

    ``cosine``: scores are inner products (vectors are unit, so cosines),
    highest first. ``l2``: scores are squared Euclidean distances, lowest
    first; for unit vectors ``|q - x|^2 = 2 - 2 cos``, so the order is the
    same and only the numbers differ.
    """

    def __init__(self, ids: Sequence[str], vectors: np.ndarray, metric: str = "cosine"):
        check_metric(metric)
        vectors = np.ascontiguousarray(vectors, np.float32)
        if vectors.ndim != 2 or len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for vectors of shape {vectors.shape}")
        self.ids, self.vectors, self.metric = list(ids), vectors, metric
        self._sq_norms = np.einsum("ij,ij->i", vectors, vectors)

    @classmethod
    def from_files(cls: type[_Searcher], files: Sequence[str], metric: str = "cosine") -> _Searcher:
        ids, parts = [], []
        for path in files:
            table = read_table(path, ["item_id", "vector"])
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
        check_k(k)
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


class IndexSearcher:
    """A run's FAISS index shards (``pipeline.index.runs.Run``) behind the :class:`ExactSearcher` interface.

    Scores come back in the requested ``metric``'s terms whatever the index
    was built with. Item and query vectors are unit vectors, so
    ``|q - x|^2 = 2 - 2 q.x`` converts exactly between an ``ip`` index's inner
    products and ``l2`` distances (and back for an ``l2`` index); the ranking is
    the same either way. Missing results (fewer than ``k`` found, e.g. a small
    ``nprobe``) are dropped from the id lists and scored -inf (cosine) or
    +inf (l2).
    """

    def __init__(self, run, metric: str = "cosine", nprobe: int | None = None):
        check_metric(metric)
        check_nprobe(nprobe)
        self.run, self.metric = run, metric
        self.index_metric, self.factory = run.info.metric, run.info.factory
        self.nprobe = (nprobe if nprobe is not None else run.default_nprobe) if run.index.ivf else None
        self.nprobe_ignored = nprobe is not None and not run.index.ivf  # a flat index scans everything
        # the recorded setting (nprobe, k_factor, efSearch) with the caller's nprobe over it
        self.params = run.search_params(self.nprobe if run.index.ivf else None)
        self.ids = [str(i) for shard in sorted(run.item_ids) for i in run.item_ids[shard]]

    @property
    def conversion(self) -> str:
        """How the index's scores become the metric's ('' when they are used as they are)."""
        if self.index_metric == "ip" and self.metric == "l2":
            return "l2 distances from the ip index as 2 - 2*ip (unit vectors)"
        if self.index_metric == "l2" and self.metric == "cosine":
            return "cosines from the l2 index as 1 - d/2 (unit vectors)"
        return ""

    def describe(self) -> dict:
        return {"kind": "index", "factory": self.factory, "index_metric": self.index_metric, "metric": self.metric,
                "nprobe": self.nprobe, "search_params": self.params, "conversion": self.conversion or None}

    def label(self) -> str:
        others = ", ".join(f"{k} {v}" for k, v in self.params.items() if k != "nprobe")
        if self.nprobe is not None:
            probe = f", nprobe {self.nprobe}" + (f", {others}" if others else "")
        elif others:
            probe = f", {others}" + ("; --nprobe ignored" if self.nprobe_ignored else "")
        else:
            probe = ", exact flat scan" + ("; --nprobe ignored" if self.nprobe_ignored else "")
        conv = f"; {self.conversion}" if self.conversion else ""
        return f"index {self.factory} ({self.index_metric}{probe}){conv}"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        check_k(k)
        scores, ids = self.run.search(queries, k, params=self.params)
        found = np.isfinite(scores)
        # Run.search gives inner products (ip) or negative squared distances (l2); convert to the metric
        if self.index_metric == "ip":
            scores = scores if self.metric == "cosine" else 2 - 2 * scores
        else:
            scores = 1 + scores / 2 if self.metric == "cosine" else -scores
        scores = np.where(found, scores, -np.inf if self.metric == "cosine" else np.inf).astype(np.float32)
        width = max((len(row) for row in ids), default=0)
        return scores[:, :width], ids


class ExactRunSearcher(ExactSearcher):
    """:class:`ExactSearcher` that says what it is, like :class:`IndexSearcher`."""

    reason = ""

    def describe(self) -> dict:
        return {"kind": "exact", "metric": self.metric, "reason": self.reason or None}

    def label(self) -> str:
        return f"exact {self.metric}" + (f" ({self.reason})" if self.reason else "")


def open_searcher(run_dir: str, manifest: Manifest, embedding_files: Sequence[str], metric: str = "cosine",
                  exact: bool = False, nprobe: int | None = None):
    """The run's index when it has one (``nprobe`` defaults to the manifest's recommended one), exact
    search over its embeddings otherwise or when ``exact`` is set."""
    if not exact and manifest.index is not None:
        from pipeline.index.runs import open_run

        return IndexSearcher(open_run(run_dir), metric, nprobe)
    searcher = ExactRunSearcher.from_files(embedding_files, metric)
    searcher.reason = "--exact" if exact else "the run has no index"
    return searcher
