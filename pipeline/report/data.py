"""What ``report.html`` shows beyond the manifest, gathered from the run's own files (no Beam).

The publish stage calls :func:`gather` once every shard, dead letter and index
file exists, and writes the result as ``report/data.json`` (beside the
manifest, listed in its ``files``), so the report can be re-rendered later
(after the pipeline, with its timings) without the previous run or the
pipeline's state. Everything here is bounded: the gallery searches a few
items, dead letters keep 5 examples per reason, and the drift check reads at
most ``DRIFT_CAP`` changed items' vectors, chosen by smallest id hash.
"""
from __future__ import annotations

import base64
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.index import indexing
from pipeline.report.sample import SampleItem, Thumbnail, sample_key, smallest
from schemas.embeddings import vectors_of
from schemas.manifest import IndexInfo, Manifest

GALLERY_ITEMS = 8
NEIGHBOURS = 5
EXAMPLES_PER_REASON = 5
DETAIL_CHARS = 400  # an example's detail or source is cut here (the Parquet keeps 2000)
DRIFT_CAP = 10_000
DRIFT_BINS = 20
THUMBNAILS = "report/thumbnails.parquet"
DATA = "report/data.json"
THUMBNAIL_SCHEMA = pa.schema([("item_id", pa.string()), ("key", pa.int64()), ("content_hash", pa.string()),
                              ("jpeg", pa.binary())])


def _open_parquet(path: str) -> pq.ParquetFile:
    """A seekable reader: only the column chunks asked for are read (local files and object stores alike)."""
    return pq.ParquetFile(storage.open_read(path))


def read_columns(paths: list[str], columns: list[str]) -> pa.Table:
    """Only ``columns`` of every file (cheap: Parquet is columnar)."""
    tables = [_open_parquet(p).read(columns=columns) for p in paths]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def read_rows(paths: list[str], item_ids: set[str], columns: list[str]) -> dict[str, dict]:
    """``columns`` (and ``vector`` as float32) of the rows whose item id is in ``item_ids``.

    The item-id column is read whole; other columns only from row groups that hold a wanted id.
    """
    out: dict[str, dict] = {}
    if not item_ids:
        return out
    for path in paths:
        parquet = _open_parquet(path)
        for group in range(parquet.num_row_groups):
            ids = parquet.read_row_group(group, columns=["item_id"]).column("item_id").to_pylist()
            rows = [i for i, item in enumerate(ids) if item in item_ids]
            if not rows:
                continue
            table = parquet.read_row_group(group, columns=["item_id", *columns]).take(rows)
            vectors = vectors_of(table) if "vector" in columns else None
            plain = table.drop(["vector"]) if "vector" in columns else table
            for i, row in enumerate(plain.to_pylist()):
                if vectors is not None:
                    row["vector"] = vectors[i]
                out[row["item_id"]] = row
    return out


def _cut(text: str | None, chars: int = DETAIL_CHARS) -> str | None:
    return text if text is None or len(text) <= chars else text[: chars - 1] + "\u2026"


def dead_letter_examples(paths: list[str], per_reason: int = EXAMPLES_PER_REASON) -> dict[str, list[dict]]:
    """Up to ``per_reason`` dead-letter rows per reason code (smallest item ids first, so reruns agree)."""
    table = read_columns(paths, ["item_id", "stage", "reason", "detail", "source"])
    by_reason: dict[str, list[dict]] = {}
    for row in sorted(table.to_pylist(), key=lambda r: (r["reason"], r["item_id"] or "")):
        examples = by_reason.setdefault(row["reason"], [])
        if len(examples) < per_reason:
            examples.append({k: _cut(row[k]) for k in ("item_id", "stage", "detail", "source")})
    return by_reason


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def open_index(run_dir: str, index: IndexInfo) -> tuple[indexing.ShardedIndex, dict[int, list[str]]]:
    """The run's own index shards (from the index block, before the manifest exists) and ids by shard."""
    shards, ids = [], {}
    for entry in index.shards:
        shards.append(indexing.from_bytes(storage.read_bytes(f"{run_dir}/{entry.index}")))
        ids[entry.shard] = _open_parquet(f"{run_dir}/{entry.ids}").read(columns=["item_id"]).column(
            "item_id").to_pylist()
    return indexing.ShardedIndex(shards, index.metric), ids


def _tile(item_id: str, sample: dict[str, SampleItem], thumbs: dict[str, bytes], rows: dict[str, dict]) -> dict:
    known = sample.get(item_id)
    # the modalities the vector was made from (the catalog item may have more, e.g. audio without a model)
    modalities = rows.get(item_id, {}).get("modalities") or (known.modalities if known else [])
    tile = {"item_id": item_id, "title": known.title if known else None, "modalities": list(modalities)}
    transcript = rows.get(item_id, {}).get("transcript")
    if item_id in thumbs:
        tile["thumbnail"] = _data_uri(thumbs[item_id])
    elif known is not None and known.text:
        tile["text"] = known.text
    elif transcript:  # an audio-only item: what its speech said
        tile["text"] = "\U0001f50a " + _cut(transcript, 300)
    tile["sampled"] = known is not None
    return tile


def gallery(run_dir: str, index: IndexInfo | None, embedding_files: list[str], sample: list[SampleItem],
            thumbs: dict[str, bytes], size: int = GALLERY_ITEMS, k: int = NEIGHBOURS) -> dict:
    """The first ``size`` embedded sample items and their top-``k`` neighbours from the run's own index."""
    if not index or not index.shards:
        return {"items": [], "note": "no index in this run (--index off)"}
    by_id = {s.item_id: s for s in sample}
    embedded = read_rows(embedding_files, set(by_id), [])  # item ids only: the sample may hold dead-lettered items
    queries = [s for s in sample if s.item_id in embedded][:size]
    if not queries:
        return {"items": [], "note": "no embedded items in the report sample"}
    rows = read_rows(embedding_files, {q.item_id for q in queries}, ["vector", "modalities", "transcript"])
    sharded, ids_by_shard = open_index(run_dir, index)
    nprobe = index.recall.recommended_nprobe if index.recall else None
    vectors = np.stack([rows[q.item_id]["vector"] for q in queries]).astype(np.float32)
    scores, faiss_ids = sharded.search(vectors, k + 1, nprobe)
    if sharded.metric == "l2":
        scores = -scores
    shard, row = indexing.split_ids(faiss_ids)
    found: list[list[tuple[str, float]]] = []
    for q, srow, rrow, frow, score_row in zip(queries, shard, row, faiss_ids, scores):
        hits = [(ids_by_shard[int(s)][int(r)], float(sc)) for s, r, f, sc in zip(srow, rrow, frow, score_row) if f >= 0]
        found.append([(item, sc) for item, sc in hits if item != q.item_id][:k])
    rows.update(read_rows(embedding_files, {item for hits in found for item, _ in hits} - set(rows),
                          ["modalities", "transcript"]))
    items = []
    for q, hits in zip(queries, found):
        entry = _tile(q.item_id, by_id, thumbs, rows)
        entry["neighbours"] = [dict(_tile(item, by_id, thumbs, rows), score=round(sc, 4)) for item, sc in hits]
        items.append(entry)
    return {"items": items, "k": k, "nprobe": nprobe, "metric": sharded.metric,
            "score": "inner product" if sharded.metric == "ip" else "negative squared L2 distance",
            "sample": f"the {len(queries)} embedded items with the smallest item-id hashes"}


def histogram(values: np.ndarray, lo: float, hi: float, bins: int) -> dict:
    counts, edges = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
    return {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]}


def vector_drift(previous_files: list[str], embedding_files: list[str], cap: int = DRIFT_CAP) -> dict:
    """Cosine between last run's and this run's vector for changed items (hash differs), at most ``cap``."""
    now = read_columns(embedding_files, ["item_id", "content_hash"])
    before = read_columns(previous_files, ["item_id", "content_hash"]).rename_columns(["item_id", "previous_hash"])
    both = now.join(before, "item_id", join_type="inner")  # in Arrow: no Python object per catalog row
    changed = both.filter(pc.not_equal(both["content_hash"], both["previous_hash"])).column("item_id").to_pylist()
    picked = sorted(changed, key=lambda i: (sample_key(i), i))[:cap]
    if not picked:
        return {"changed": len(changed), "sampled": 0}
    wanted = set(picked)
    old, new = read_rows(previous_files, wanted, ["vector"]), read_rows(embedding_files, wanted, ["vector"])
    pairs = [(old[i]["vector"], new[i]["vector"]) for i in picked if i in old and i in new]
    a = np.stack([p[0] for p in pairs]).astype(np.float64)
    b = np.stack([p[1] for p in pairs]).astype(np.float64)
    cos = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    # bins from 0 to 1, or from the tenth below the lowest cosine when one is negative
    lo = max(-1.0, min(0.0, math.floor(float(cos.min()) * 10) / 10))
    return {"changed": len(changed), "sampled": len(pairs), "min": round(float(cos.min()), 4),
            "median": round(float(np.median(cos)), 4), "max": round(float(cos.max()), 4),
            "histogram": histogram(cos, lo, 1.0, DRIFT_BINS)}


def previous_counts(previous_manifest: Manifest | None) -> dict | None:
    """The previous run's headline counts, for tonight's counts to be set against."""
    if not previous_manifest:
        return None
    counts, inc = previous_manifest.counts, (previous_manifest.counts.incremental if previous_manifest.counts else None)
    return {"run_id": previous_manifest.run_id or None, "created_at": previous_manifest.created_at,
            "input_rows": counts.input_rows if counts else None, "embedded": counts.embedded if counts else None,
            "dead_letters": counts.failed if counts else 0, "skipped": counts.skipped if counts else None,
            **{k: getattr(inc, k) if inc else None for k in ("reused", "encoded", "new", "changed", "deleted")}}


def carried_thumbnails(previous_thumbnails: pa.Table | None, sample: list[SampleItem], fresh: dict[str, bytes],
                       content_hashes: dict[str, str]) -> dict[str, bytes]:
    """Last run's thumbnails for sample items not fetched tonight whose content hash is unchanged (reused)."""
    if previous_thumbnails is None:
        return {}
    wanted = {s.item_id for s in sample} - set(fresh)
    return {r["item_id"]: r["jpeg"] for r in previous_thumbnails.to_pylist()
            if r["item_id"] in wanted and content_hashes.get(r["item_id"]) == r["content_hash"]}


def thumbnails_table(sample: list[SampleItem], thumbs: dict[str, bytes], content_hashes: dict[str, str]) -> pa.Table:
    """The sample's thumbnails with the content hash they were made for (the next run carries them)."""
    rows = [{"item_id": s.item_id, "key": s.key, "content_hash": content_hashes.get(s.item_id), "jpeg": thumbs[s.item_id]}
            for s in sample if s.item_id in thumbs and s.item_id in content_hashes]
    return pa.Table.from_pylist(rows, schema=THUMBNAIL_SCHEMA)


def gather(run_dir: str, index: IndexInfo | None, embedding_files: list[str], dead_files: list[str],
           sample: list[SampleItem], fresh_thumbnails: list[Thumbnail], previous_dir: str | None,
           previous_reusable: bool, previous_manifest: Manifest | None) -> tuple[dict, pa.Table]:
    """The report's data (JSON-ready) and the thumbnails table to write beside it."""
    sample = smallest(sample, len(sample))
    fresh = {t.item_id: t.jpeg for t in fresh_thumbnails}
    hashes = {i: r["content_hash"] for i, r in read_rows(embedding_files, {s.item_id for s in sample},
                                                          ["content_hash"]).items()}
    previous_files = [f"{previous_dir}/{path}" for path in previous_manifest.file_paths("embeddings/")
                      ] if previous_dir and previous_manifest else []
    previous_thumbs = None
    if previous_dir and storage.exists(f"{previous_dir}/{THUMBNAILS}"):
        previous_thumbs = _open_parquet(f"{previous_dir}/{THUMBNAILS}").read()
    thumbs = {**carried_thumbnails(previous_thumbs, sample, fresh, hashes), **fresh}
    data = {
        "gallery": gallery(run_dir, index, embedding_files, sample, thumbs),
        "dead_letter_examples": dead_letter_examples(dead_files),
        "previous_counts": previous_counts(previous_manifest),
    }
    if previous_files and previous_reusable:
        data["drift"] = vector_drift(previous_files, embedding_files)
    elif previous_dir:
        data["drift"] = {"note": "the previous run used other models or another layout: its vectors are not comparable"}
    return data, thumbnails_table(sample, thumbs, hashes)
