"""Retrieval metrics over ranked id lists; pure functions, binary relevance.

recall@k = |relevant in top k| / |relevant| (a query with two relevant items
reaches 1.0 at k only when both are in the top k); MRR = 1 / rank of the
first relevant item in the ranking (0 when none is retrieved); nDCG@k with
gains 1 for relevant items and the ideal ranking putting all relevant first.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

RECALL_KS = (1, 5, 10)
NDCG_K = 10


def recall_at(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    if not relevant:
        raise ValueError("a query needs at least one relevant item")
    return len(set(ranked[:k]) & relevant) / len(relevant)


def reciprocal_rank(ranked: Sequence[str], relevant: set[str]) -> float:
    for rank, item in enumerate(ranked, 1):
        if item in relevant:
            return 1.0 / rank
    return 0.0


def ndcg_at(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    dcg = sum(1.0 / math.log2(rank + 1) for rank, item in enumerate(ranked[:k], 1) if item in relevant)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(relevant), k) + 1))
    return dcg / ideal


def query_metrics(ranked: Sequence[str], relevant: Iterable[str]) -> dict[str, float]:
    rel = set(relevant)
    out = {f"recall@{k}": recall_at(ranked, rel, k) for k in RECALL_KS}
    out["mrr"] = reciprocal_rank(ranked, rel)
    out[f"ndcg@{NDCG_K}"] = ndcg_at(ranked, rel, NDCG_K)
    return out


def mean_metrics(per_query: Sequence[dict[str, float]]) -> dict[str, float]:
    """Means over queries, plus the query count."""
    if not per_query:
        return {"queries": 0}
    keys = per_query[0].keys()
    return {"queries": len(per_query), **{k: sum(q[k] for q in per_query) / len(per_query) for k in keys}}


def summarize(results: Sequence[tuple[str, dict[str, float]]]) -> dict:
    """``[(query modality, query_metrics)]`` -> overall and per-modality means."""
    by_modality: dict[str, list] = {}
    for modality, m in results:
        by_modality.setdefault(modality, []).append(m)
    return {"overall": mean_metrics([m for _, m in results]),
            "by_modality": {k: mean_metrics(v) for k, v in sorted(by_modality.items())}}


def word_edits(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance over words (substitutions, insertions, deletions): the numerator of a WER."""
    row = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hypothesis, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]
