"""schemas/manifest.py: the typed manifest reads every manifest written so far and writes them back unchanged."""
from __future__ import annotations

import dataclasses
import json

import pytest

from tests.conftest import DATA, run_sample_text_image
from schemas.catalog import CatalogColumns
from schemas.manifest import (FORMAT_VERSION, Catalog, Counts, IndexInfo, Manifest, ManifestError, RecallRow,
                              recall_key)

V1 = DATA / "manifest_v1.json"  # written by `catalog-index run --preset offline` of the code before the schema


def test_version_1_manifest_round_trips_byte_for_byte():
    text = V1.read_text()
    manifest = Manifest.from_json(text)
    assert manifest.format_version == 1 == FORMAT_VERSION
    assert manifest.to_json() == text
    assert manifest.to_dict() == json.loads(text)


def test_version_1_manifest_reads_into_typed_parts():
    m = Manifest.from_json(V1.read_text())
    raw = json.loads(V1.read_text())
    assert m.run_id == raw["run_id"]
    assert m.catalog.column_mapping() == CatalogColumns()
    assert m.counts.input_rows == m.counts.accounted == raw["counts"]["input_rows"]
    assert m.counts.incremental.encoded == raw["counts"]["incremental"]["encoded"]
    assert m.embeddings.dim == raw["embeddings"]["dim"] == m.index.dim
    assert [s.count for s in m.index.shards] == [s["count"] for s in raw["index"]["shards"]]
    assert m.index.quantizer.reason == raw["index"]["quantizer"]["reason"]
    assert m.index.recall.table[0].recall(10) == raw["index"]["recall"]["table"][0]["recall_10_at_10"]
    assert m.index.recall.recall_at(m.index.recommended_params()) == 1.0
    assert m.models["text"].real and m.models["text"].fingerprint == raw["models"]["text"]["fingerprint"]
    assert m.asr.get("language") == raw["asr"]["language"]
    assert m.file_paths("embeddings/") == [f["path"] for f in raw["files"] if f["path"].startswith("embeddings/")]
    assert m.file("report.html").sha256 == next(f["sha256"] for f in raw["files"] if f["path"] == "report.html")


def test_unknown_keys_are_kept_and_written_back():
    raw = json.loads(V1.read_text())
    raw["serving_hint"] = {"replicas": 3}
    raw["index"]["quantizer"]["future_figure"] = 0.5
    raw["index"]["recall"]["table"][0]["recall_5_at_5"] = 0.9
    m = Manifest.from_dict(raw)
    assert m.extra == {"serving_hint": {"replicas": 3}}
    assert m.index.quantizer.get("future_figure") == 0.5
    assert m.index.recall.table[0].recall(5) == 0.9
    assert m.to_dict() == raw


def test_parts_are_frozen_and_do_not_alias_the_input():
    raw = json.loads(V1.read_text())
    m = Manifest.from_dict(raw)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.run_id = "other"  # type: ignore[misc]
    raw["counts"]["dead_letters"]["decode_failed"] = 5
    assert m.counts.dead_letters == {}


def test_a_newer_format_is_refused_with_a_clear_error():
    raw = dict(json.loads(V1.read_text()), format_version=FORMAT_VERSION + 1)
    with pytest.raises(ManifestError, match="format_version 2"):
        Manifest.from_dict(raw)
    with pytest.raises(ManifestError, match="not JSON"):
        Manifest.from_json("{not json")


def test_older_shapes_still_read():
    # the oldest manifests recorded the catalog as a plain path and the search setting only as an nprobe
    old = {"run_id": "r0", "catalog": "cat.parquet",
           "index": {"factory": "IVF4,PQ8", "recall": {"k": 10, "recommended_nprobe": 4,
                                                      "table": [{"nprobe": 4, "recall_10_at_10": 0.97}]}}}
    m = Manifest.from_dict(old)
    assert m.catalog == Catalog(path="cat.parquet") and m.catalog.to_dict() == "cat.parquet"
    assert m.catalog.column_mapping() == CatalogColumns()
    assert m.index.recommended_params() == {"nprobe": 4}
    assert m.index.recall.recall_at({"nprobe": 4}) == 0.97
    assert m.index.recall.table[0].setting() == {"nprobe": 4}


def test_recorded_column_mapping():
    catalog = Catalog.from_dict({"path": "c.parquet", "missing_columns": [],
                                 "columns": {"item_id": "sku", "title": "name", "description": "description",
                                             "image_uris": "pics", "audio_uri": "audio_uri",
                                             "passthrough": ["brand"]}})
    assert catalog.column_mapping() == CatalogColumns(item_id="sku", title="name", image_uris="pics",
                                                      passthrough=("brand",))


def test_recall_key_and_rows():
    assert recall_key(10) == "recall_10_at_10"
    row = RecallRow.from_dict({"params": {"nprobe": 8}, "query_set": "held_out", "nprobe": 8,
                               "recall_10_at_10": 0.9, "recall_1_at_1": 0.8, "ms_per_query": 0.1,
                               "single_query_ms_p50": 0.2})
    assert (row.recall(10), row.recall(1), row.setting()) == (0.9, 0.8, {"nprobe": 8})
    assert list(row.to_dict()) == ["params", "query_set", "nprobe", "recall_10_at_10", "recall_1_at_1",
                                   "ms_per_query", "single_query_ms_p50"]


def test_counts_add_up():
    counts = Counts(input_rows=10, embedded=6, dead_letters={"decode_failed": 3}, skipped=1)
    assert (counts.failed, counts.accounted, counts.failed_fraction) == (3, 10, 0.3)
    assert IndexInfo().recommended_params() == {}


def test_a_fresh_run_round_trips(tmp_path, tiny_text_dir):
    run_dir = run_sample_text_image(tmp_path / "out", "r1", tiny_text_dir)
    text = (tmp_path / "out" / "runs" / "r1" / "manifest.json").read_text()
    m = Manifest.from_json(text)
    assert m.to_json() == text
    assert m.run_id == "r1" and m.counts.accounted == m.counts.input_rows
    assert m.index is not None and m.index.ntotal == m.counts.embedded
    assert sorted(m.file_paths()) == sorted(f["path"] for f in json.loads(text)["files"])
    assert run_dir.endswith("r1")
