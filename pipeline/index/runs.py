"""Open a published run from its manifest and search all its index shards together (no Beam).

``open_run(OUT)`` follows ``OUT/LATEST``; ``open_run(OUT/runs/<id>)`` opens
that run. Only runs with a manifest open: a run killed before publishing has
none, so it can never be served by mistake.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.index import indexing
from pipeline.storage import RunNotFound, read_bytes, read_manifest, read_table, resolve_run_dir
from schemas.manifest import IndexInfo, Manifest


@dataclasses.dataclass
class Run:
    """A published run's manifest and its index shards, ready to search."""

    run_dir: str
    manifest: Manifest
    index: indexing.ShardedIndex
    item_ids: dict[int, np.ndarray]  # shard -> item ids by row

    @property
    def default_params(self) -> dict:
        """The search setting the run recommends (nprobe, k_factor, efSearch: those that apply)."""
        return self.info.recommended_params()

    @property
    def info(self) -> IndexInfo:
        """The manifest's index block (a Run always has one)."""
        if self.manifest.index is None:
            raise RunNotFound(f"run {self.run_dir} was built without an index (--index off)")
        return self.manifest.index

    @property
    def default_nprobe(self) -> int | None:
        return self.default_params.get("nprobe")

    def search_params(self, nprobe: int | None = None, params: dict | None = None) -> dict:
        """The recorded setting with ``params`` and ``nprobe`` (when given) put over it."""
        out = {**self.default_params, **(params or {})}
        if nprobe is not None:
            out["nprobe"] = nprobe
        return out

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None, params: dict | None = None
               ) -> tuple[np.ndarray, list[list[str]]]:
        """Top-``k`` items for each query row: scores [n, k] (higher is better) and item ids.

        Scores are inner products (metric ``ip``) or negative squared L2
        distances (``l2``). A query with fewer than ``k`` results (a tiny
        catalog, or a small nprobe) gets a shorter id list and -inf scores in
        the missing places. The search setting (nprobe, k_factor, efSearch)
        defaults to the manifest's recommended one; ``nprobe``/``params`` override it.
        """
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        dim = self.info.dim
        if queries.shape[1] != dim:
            raise ValueError(f"queries have dimension {queries.shape[1]}, the index has {dim}")
        self.index.set_params(self.search_params(nprobe if self.index.ivf else None, params))
        scores, ids = self.index.search(queries, k)
        scores = scores.astype(np.float32)
        if self.index.metric == "l2":
            scores = -scores
        shard, row = indexing.split_ids(ids)
        found = ids >= 0
        scores[~found] = -np.inf
        names = [[str(self.item_ids[s][r]) for s, r, ok in zip(srow, rrow, frow) if ok]
                 for srow, rrow, frow in zip(shard, row, found)]
        return scores, names


def _read_ids(path: str, shard: int) -> np.ndarray:
    table = read_table(path)
    faiss_ids = table.column("faiss_id").to_numpy()
    if not np.array_equal(faiss_ids, indexing.make_ids(shard, len(faiss_ids))):
        raise ValueError(f"{path}: faiss ids are not shard {shard}'s rows 0..{len(faiss_ids) - 1}")
    return np.asarray(table.column("item_id").to_pylist(), dtype=object)


def open_run(path: str) -> Run:
    """Opens the run at ``path`` (a run directory, or an output root whose LATEST is followed)."""
    run_dir = resolve_run_dir(path)
    manifest = read_manifest(run_dir)
    info = manifest.index
    if not info:
        raise RunNotFound(f"run {run_dir} was built without an index (--index off)")
    shards, item_ids = [], {}
    for entry in info.shards:
        shards.append(indexing.from_bytes(read_bytes(f"{run_dir}/{entry.index}")))
        item_ids[entry.shard] = _read_ids(f"{run_dir}/{entry.ids}", entry.shard)
    return Run(run_dir, manifest, indexing.ShardedIndex(shards, info.metric), item_ids)
