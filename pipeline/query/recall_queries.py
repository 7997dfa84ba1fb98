"""The run's own queries for the recall self-check (``--recall_queries``), encoded before the pipeline starts.

A JSON-lines file in ``eval``'s format (``modality``, ``query``, ``relevant``)
is read and encoded by the query side's :class:`~pipeline.query.encoder.QueryEncoder`
with this run's models, spaces and layout (from the run's metadata, the same
dict its embeddings files record). Only the vectors matter here: the
self-check compares the index's top-k with exact search over every indexed
vector, so ``relevant`` is not used (``eval`` measures relevance).

Why in the launcher, not in a worker: the file holds hundreds of queries, a
second's work on a CPU, while encoding them inside the index stage would load
every model once more on an index worker (a GPU worker's memory on Dataflow).
The encoded vectors (queries x dim floats, a few MB at most) travel inside the
pipeline graph as a constant, so every worker of the index stage sees the same
vectors, and a rerun encodes them the same way (fixed-shape forward passes).
A query that cannot be encoded is counted with its reason, never silently dropped.
"""
from __future__ import annotations

import dataclasses

import numpy as np


class RecallQueriesError(ValueError):
    """The recall queries file cannot be used (unreadable, not eval's format, nothing encodable)."""


@dataclasses.dataclass(frozen=True)
class RecallQueries:
    """Encoded queries [n, dim] and what the manifest says about them."""

    vectors: np.ndarray
    info: dict  # file, queries, encoded, by_modality, failed: [{line, reason}]


def encode_recall_queries(path: str, metadata: dict, run_dir: str, device: str = "cpu") -> RecallQueries:
    """Reads ``path`` and encodes every query with the run described by ``metadata``."""
    from pipeline.query.evaluate import QueriesFileError, read_queries
    from pipeline.query.encoder import QueryEncoder, QueryError, RunInfo
    from schemas.manifest import Manifest

    try:
        queries = read_queries(path)
    except (QueriesFileError, OSError) as e:
        raise RecallQueriesError(f"--recall_queries {path}: {e}") from None
    try:
        encoder = QueryEncoder(RunInfo(run_dir, Manifest(), metadata, ()), device)
    except QueryError as e:
        raise RecallQueriesError(f"--recall_queries: {e}") from None
    vectors: list[np.ndarray] = []
    failed: list[dict] = []
    by_modality: dict[str, int] = {}
    for modality in dict.fromkeys(q.modality for q in queries):
        group = [q for q in queries if q.modality == modality]
        try:
            encoded, errors = encoder.encode_each(modality, [q.query for q in group])
        except QueryError as e:  # no encoder for the modality in this run: every such query fails
            encoded, errors = None, {i: str(e) for i in range(len(group))}
        for i, q in enumerate(group):
            if i in errors:
                failed.append({"line": q.line, "reason": errors[i]})
            else:
                assert encoded is not None  # errors covers every query when nothing was encoded
                vectors.append(encoded[i])
                by_modality[modality] = by_modality.get(modality, 0) + 1
    if not vectors:
        raise RecallQueriesError(f"--recall_queries {path}: no query could be encoded "
                                 f"(first: line {failed[0]['line']}: {failed[0]['reason']})")
    info = {"file": path, "queries": len(queries), "encoded": len(vectors), "by_modality": by_modality,
            "failed": sorted(failed, key=lambda f: f["line"])}
    return RecallQueries(np.asarray(vectors, np.float32), info)
