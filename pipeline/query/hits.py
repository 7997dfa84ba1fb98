"""What a search hit shows: its title and snippet, read from the run's embeddings rows (no catalog needed)."""
from __future__ import annotations

from typing import Sequence

import pyarrow.dataset as ds

from schemas.embeddings import display_fields


def describe_hits(embedding_files: Sequence[str], item_ids: Sequence[str]) -> dict[str, dict]:
    """item id -> {"title", "snippet"} for the given ids.

    Only the matching rows are read (a filter on ``item_id``; shards are sorted
    by id, so row-group statistics skip most of a large run). Runs written
    before the display columns existed fall back to their transcripts.
    """
    if not item_ids or not embedding_files:
        return {}
    dataset = ds.dataset(list(embedding_files), format="parquet")
    names = set(dataset.schema.names)
    columns = ["item_id"] + [c for c in ("title", "snippet", "transcript") if c in names]
    table = dataset.to_table(columns=columns, filter=ds.field("item_id").isin(list(dict.fromkeys(item_ids))))
    out = {}
    for row in table.to_pylist():
        if "snippet" in row:
            out[row["item_id"]] = {"title": row.get("title"), "snippet": row.get("snippet")}
        else:
            out[row["item_id"]] = display_fields(None, None, row.get("transcript"))
    return out


def hit_rows(item_ids: Sequence[str], scores: Sequence[float], shown: dict[str, dict]) -> list[dict]:
    """Ranked hits as JSON-ready dicts: rank, item_id, score, title, snippet."""
    return [{"rank": rank, "item_id": item, "score": round(float(score), 6),
             "title": shown.get(item, {}).get("title"), "snippet": shown.get(item, {}).get("snippet")}
            for rank, (item, score) in enumerate(zip(item_ids, scores), 1)]


def format_hit(hit: dict, label: str = "score") -> str:
    """``  1  mug-01  score=0.8123  Ceramic espresso cup — A small white cup...``"""
    text = " — ".join(t for t in (hit["title"], hit["snippet"]) if t)
    return f"{hit['rank']:3d}  {hit['item_id']}  {label}={hit['score']:.4f}" + (f"  {text}" if text else "")
