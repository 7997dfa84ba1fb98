"""Retrieval evaluation of a run on labelled queries (no Beam).

Queries file: JSON lines ``{"modality": "text"|"image"|"audio", "query": str,
"relevant": [item_id, ...]}``; media queries are paths relative to the file.
A query whose modality this run cannot encode is not dropped silently: it is
counted under ``skipped`` with the reason. A query whose own content cannot be
encoded (an unreadable file, a clip with no speech in a run without CLAP) is
scored as a miss and listed under ``failed``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import posixpath
from typing import Sequence

from pipeline.query import metrics
from pipeline.query.encoder import QUERY_MODALITIES, QueryEncoder, QueryError, RunInfo
from pipeline.storage import read_bytes

DEPTH = 100  # ranks retrieved per query; MRR counts a first relevant item up to here


class QueriesFileError(ValueError):
    """A labelled-queries file with a malformed line (names the file, line and problem)."""


@dataclasses.dataclass(frozen=True)
class LabelledQuery:
    modality: str
    query: str  # text, or a media path (absolute after reading)
    relevant: tuple[str, ...]
    line: int


def read_queries(path: str) -> list[LabelledQuery]:
    base = posixpath.dirname(path)
    out = []
    lines = read_bytes(path).decode("utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise QueriesFileError(f"{path}:{n}: not JSON ({e})") from None
        modality, query, relevant = row.get("modality"), row.get("query"), row.get("relevant")
        if modality not in QUERY_MODALITIES:
            raise QueriesFileError(f"{path}:{n}: modality {modality!r} is not one of {QUERY_MODALITIES}")
        if not isinstance(query, str) or not query.strip():
            raise QueriesFileError(f"{path}:{n}: query must be a non-empty string, got {query!r}")
        if not isinstance(relevant, list) or not relevant or not all(isinstance(r, str) for r in relevant):
            raise QueriesFileError(f"{path}:{n}: relevant must be a non-empty list of item ids, got {relevant!r}")
        if modality != "text" and "://" not in query and not os.path.isabs(query):
            query = posixpath.join(base, query)
        out.append(LabelledQuery(modality, query, tuple(relevant), n))
    if not out:
        raise QueriesFileError(f"{path} has no queries")
    return out


def evaluate(run: RunInfo, queries: Sequence[LabelledQuery], searcher, encoder: QueryEncoder,
             depth: int = DEPTH) -> dict:
    """Encodes, searches and scores every query; returns the report (overall, per modality, per query)."""
    results, per_query = [], []
    skipped: dict[str, dict] = {}
    failed: dict[str, list[dict]] = {}
    known = set(searcher.ids) if hasattr(searcher, "ids") else None
    for modality in QUERY_MODALITIES:
        group = [q for q in queries if q.modality == modality]
        if not group:
            continue
        try:
            vectors, errors = encoder.encode_each(modality, [q.query for q in group])
        except QueryError as e:  # the run cannot encode this modality at all
            skipped[modality] = {"queries": len(group), "reason": str(e)}
            continue
        scores, ids = searcher.search(vectors, depth)
        for j, (q, ranked, s) in enumerate(zip(group, ids, scores)):
            # a query whose own content fails (no speech, unreadable file) is a miss, not left out
            ranked = [] if j in errors else ranked
            m = metrics.query_metrics(ranked, q.relevant)
            results.append((modality, m))
            per_query.append({"line": q.line, "modality": modality, "query": q.query, "relevant": list(q.relevant),
                              "top": ranked[:10], "scores": [round(float(x), 5) for x in s[:min(10, len(ranked))]],
                              **({"error": errors[j]} if j in errors else {}),
                              **({"relevant_not_in_run": sorted(set(q.relevant) - known)}
                                 if known is not None and set(q.relevant) - known else {}),
                              **m})
            if j in errors:
                failed.setdefault(modality, []).append({"line": q.line, "reason": errors[j]})
    return {
        "run_id": run.manifest.run_id,
        "searcher": searcher.describe() if hasattr(searcher, "describe") else {"kind": type(searcher).__name__},
        "fusion": run.metadata["fusion"],
        "models": {s: f"{m['name']} [{m['weights_label']}]" for s, m in run.metadata["models"].items()},
        "depth": depth,
        **metrics.summarize(results),
        "skipped": skipped,
        "failed": failed,  # encoded as misses (counted in the metrics above)
        "per_query": per_query,
    }


def format_report(report: dict) -> str:
    cols = ["recall@1", "recall@5", "recall@10", "mrr", "ndcg@10"]
    lines = [f"run {report['run_id']}  fusion {report['fusion']['mode']}  models "
             + ", ".join(f"{s}: {m}" for s, m in report["models"].items()),
             f"searcher: {_searcher_line(report.get('searcher') or {})}",
             f"{'':10s} {'queries':>7s} " + " ".join(f"{c:>9s}" for c in cols)]
    rows = [("overall", report["overall"])] + list(report["by_modality"].items())
    for name, m in rows:
        if m.get("queries"):
            lines.append(f"{name:10s} {m['queries']:7d} " + " ".join(f"{m[c]:9.3f}" for c in cols))
    for modality, s in report["skipped"].items():
        lines.append(f"skipped {s['queries']} {modality} queries: {s['reason']}")
    for modality, fails in report.get("failed", {}).items():
        lines.append(f"{len(fails)} {modality} queries could not be encoded (counted as misses), first: "
                     f"line {fails[0]['line']}: {fails[0]['reason']}")
    return "\n".join(lines)


def _searcher_line(s: dict) -> str:
    if s.get("kind") == "index":
        params = s.get("search_params") or ({"nprobe": s["nprobe"]} if s.get("nprobe") is not None else {})
        probe = ", ".join(f"{k} {v}" for k, v in params.items()) or "exact flat scan"
        conv = f"; {s['conversion']}" if s.get("conversion") else ""
        return f"index {s['factory']} ({s['index_metric']}, {probe}), {s['metric']}{conv}"
    if s.get("kind") == "exact":
        return f"exact {s['metric']}" + (f" ({s['reason']})" if s.get("reason") else "")
    return str(s.get("kind", "unknown"))
