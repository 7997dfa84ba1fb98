"""Incremental runs: unchanged items reuse the previous run's vectors, the rest are encoded.

Every run here is a real pipeline run with the tiny random models; encoder
work is read back from the run's own Beam metrics, so "unchanged media never
reached the encoders" is measured, not assumed.
"""
from __future__ import annotations

import glob
import io
import json
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from PIL import Image

from encoders.media import FetchPolicy, MediaError
from pipeline.stages import incremental
from pipeline.graph import build
from pipeline.stages.incremental import (PreviousVector, check_compatible, classify, hash_item, media_token)
from pipeline.beam_metrics import counter, encoder_seconds
from pipeline.config import IncrementalConfig
from pipeline.options import CatalogIndexOptions, to_run_config
from pipeline.stages.retention import apply_retention, runs_to_delete
from pipeline.stages.records import bucket_of, join_buckets
from schemas.catalog import CATALOG_SCHEMA, CatalogItem
from schemas.embeddings import vectors_of
from schemas.manifest import Manifest
from tests.conftest import tiny_run_argv



def _jpeg(color, size=(40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_catalog(root, rows: list[dict]) -> str:
    path = os.path.join(str(root), "catalog.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA), path)
    return path


def _row(item_id, title, images=None):
    return {"item_id": item_id, "title": title, "description": None, "image_uris": images, "audio_uri": None}


def run(catalog, out, run_id, text_dir, *extra):
    """One pipeline run; returns (table sorted by id, manifest, PipelineResult)."""
    argv = tiny_run_argv(catalog, out, run_id, text_dir, *extra, batch_size=4, command=False)
    options = PipelineOptions(argv)
    config, _ = to_run_config(options.view_as(CatalogIndexOptions))
    p = beam.Pipeline(options=options)
    build(p, config)
    result = p.run()
    result.wait_until_finish()
    run_dir = os.path.join(str(out), "runs", run_id)
    files = sorted(glob.glob(os.path.join(run_dir, "embeddings", "*.parquet")))
    table = pa.concat_tables([pq.read_table(f) for f in files]).sort_by("item_id")
    with open(os.path.join(run_dir, "manifest.json")) as f:
        manifest = json.load(f)
    return table, manifest, result


def _inc(manifest) -> dict:
    block = manifest["counts"]["incremental"]
    return {k: block[k] for k in ("reused", "encoded", "new", "changed", "deleted")}


def _images_encoded(result) -> int:
    return counter(result, "catalog_index.encode.image_clip", "encoded")


def _texts_encoded(result) -> int:
    return counter(result, "catalog_index.encode.text_clip", "encoded")


@pytest.fixture(scope="module")
def nightly(tmp_path_factory, tiny_text_dir):
    """Day 1: 8 items. Day 2: one text edit, new bytes behind one unchanged URI, one item gone, one new."""
    root = tmp_path_factory.mktemp("catalog")
    (root / "img").mkdir()
    for i in range(8):
        (root / "img" / f"{i}.jpg").write_bytes(_jpeg((30 * i, 200 - 20 * i, 90)))
    day1 = [_row("a", "red mug", ["img/0.jpg"]), _row("b", "blue bag", ["img/1.jpg"]),
            _row("c", "green lamp", ["img/2.jpg"]), _row("d", "two photos", ["img/3.jpg", "img/4.jpg"]),
            _row("e", "text only"), _row("f", None, ["img/5.jpg"]), _row("g", "grey sock", ["img/6.jpg"]),
            _row("h", "white cup", ["img/7.jpg"])]
    catalog = _write_catalog(root, day1)
    out = tmp_path_factory.mktemp("out")
    first = run(catalog, out, "day1", tiny_text_dir)

    day2 = [dict(r) for r in day1 if r["item_id"] != "c"]  # c deleted
    day2[0]["title"] = "red mug, large"  # a: text changed
    (root / "img" / "1.jpg").write_bytes(_jpeg((255, 255, 0)))  # b: new bytes behind the same URI
    (root / "img" / "new.jpg").write_bytes(_jpeg((5, 5, 250)))
    day2.append(_row("i", "new item", ["img/new.jpg"]))  # i: new
    _write_catalog(root, day2)
    second = run(catalog, out, "day2", tiny_text_dir)
    return {"root": root, "catalog": catalog, "out": out, "day1": first, "day2": second}


def test_first_run_encodes_everything(nightly):
    _, manifest, result = nightly["day1"]
    assert _inc(manifest) == {"reused": 0, "encoded": 8, "new": 8, "changed": 0, "deleted": 0}
    assert manifest["counts"]["incremental"]["previous_run"] is None
    assert _images_encoded(result) == 8 and encoder_seconds(result) > 0


def test_nightly_counts_and_only_changed_media_reach_the_encoders(nightly):
    table, manifest, result = nightly["day2"]
    assert _inc(manifest) == {"reused": 5, "encoded": 3, "new": 1, "changed": 2, "deleted": 1}
    assert manifest["counts"]["incremental"]["previous_run"]["run_id"] == "day1"
    counts = manifest["counts"]
    assert counts["input_rows"] == counts["embedded"] + sum(counts["dead_letters"].values()) + counts["skipped"]
    assert table.column("item_id").to_pylist() == ["a", "b", "d", "e", "f", "g", "h", "i"]
    # a (text only changed), b (image changed), i (new): 3 images, 3 texts; nothing else was fetched or encoded
    assert counter(result, "catalog_index.fetch", "images") == 3
    assert _images_encoded(result) == 3 and _texts_encoded(result) == 3


def test_reused_vectors_are_the_previous_ones_and_changed_ones_differ(nightly):
    before, _, _ = nightly["day1"]
    after, _, _ = nightly["day2"]
    old = dict(zip(before.column("item_id").to_pylist(), vectors_of(before)))
    new = dict(zip(after.column("item_id").to_pylist(), vectors_of(after)))
    old_hash = dict(zip(before.column("item_id").to_pylist(), before.column("content_hash").to_pylist()))
    new_hash = dict(zip(after.column("item_id").to_pylist(), after.column("content_hash").to_pylist()))
    for item in "defgh":
        assert np.array_equal(old[item], new[item]) and old_hash[item] == new_hash[item]
    for item in "ab":
        assert not np.array_equal(old[item], new[item]) and old_hash[item] != new_hash[item]


def test_incremental_result_equals_a_full_run(nightly, tiny_text_dir, tmp_path):
    incremental_table, _, _ = nightly["day2"]
    full, manifest, _ = run(nightly["catalog"], tmp_path, "full", tiny_text_dir, "--previous_run", "none")
    assert _inc(manifest)["encoded"] == 8 and _inc(manifest)["reused"] == 0
    assert full.column("item_id").to_pylist() == incremental_table.column("item_id").to_pylist()
    assert np.array_equal(vectors_of(full), vectors_of(incremental_table))  # bit-identical
    for column in ("content_hash", "modalities", "num_images", "model_fingerprint"):
        assert full.column(column).to_pylist() == incremental_table.column(column).to_pylist()


@pytest.mark.parametrize("change", [["--text_weights", "random"], ["--modality_weights", "image=0.5"]],
                         ids=["model", "fusion"])
def test_model_or_fusion_change_reencodes_everything(nightly, tiny_text_dir, tmp_path, change):
    previous = os.path.join(str(nightly["out"]), "runs", "day2")
    _, manifest, result = run(nightly["catalog"], tmp_path, "changed", tiny_text_dir,
                              "--previous_run", previous, *change)
    assert _inc(manifest) == {"reused": 0, "encoded": 8, "new": 0, "changed": 8, "deleted": 0}
    assert "fingerprint" in manifest["counts"]["incremental"]["previous_run"]["not_reusable_because"]
    assert _images_encoded(result) == 8  # d has two images, e none


@pytest.mark.slow
def test_dtype_change_is_not_reused(nightly, tiny_text_dir, tmp_path):
    previous = os.path.join(str(nightly["out"]), "runs", "day2")
    _, manifest, _ = run(nightly["catalog"], tmp_path, "half", tiny_text_dir, "--previous_run", previous,
                         "--vector_dtype", "float16")
    assert _inc(manifest)["reused"] == 0
    assert "dtype" in manifest["counts"]["incremental"]["previous_run"]["not_reusable_because"]


@pytest.mark.slow
def test_metadata_change_detection(tiny_text_dir, tmp_path):
    root = tmp_path / "cat"
    (root / "img").mkdir(parents=True)
    for i in range(3):
        (root / "img" / f"{i}.jpg").write_bytes(_jpeg((80 * i, 40, 40)))
    catalog = _write_catalog(root, [_row(str(i), f"item {i}", [f"img/{i}.jpg"]) for i in range(3)])
    out = tmp_path / "out"
    meta = ("--change_detection", "metadata")
    first, m1, _ = run(catalog, out, "m1", tiny_text_dir, *meta)
    (root / "img" / "2.jpg").write_bytes(_jpeg((1, 2, 3), size=(64, 48)))  # new bytes, new size and mtime
    second, m2, result = run(catalog, out, "m2", tiny_text_dir, *meta)
    assert _inc(m2) == {"reused": 2, "encoded": 1, "new": 0, "changed": 1, "deleted": 0}
    assert _images_encoded(result) == 1
    assert m2["counts"]["incremental"]["change_detection"] == "metadata"
    hashes = second.column("content_hash").to_pylist()
    assert hashes[:2] == first.column("content_hash").to_pylist()[:2] and hashes[2] != first.column("content_hash")[2].as_py()
    # the hash written for an encoded item is the metadata one, so the next night reuses it
    _, m3, _ = run(catalog, out, "m3", tiny_text_dir, *meta)
    assert _inc(m3)["reused"] == 3


@pytest.mark.slow
def test_retention_keeps_k_runs_and_never_latest_or_unpublished(nightly, tiny_text_dir, tmp_path):
    out = tmp_path / "out"
    (out / "runs" / "in-progress" / "embeddings").mkdir(parents=True)  # no manifest: being written
    for name in ("r1", "r2", "r3"):
        run(nightly["catalog"], out, name, tiny_text_dir, "--keep_runs", "2")
    assert sorted(os.listdir(out / "runs")) == ["in-progress", "r2", "r3"]
    assert (out / "LATEST").read_text().strip() == "r3"


# ------------------------------------------------------------------ plain functions


def test_retention_plan():
    runs = [("2026-01-0%d" % i, f"/o/runs/r{i}") for i in range(1, 6)]
    assert runs_to_delete(runs, 2, set()) == ["/o/runs/r1", "/o/runs/r2", "/o/runs/r3"]
    assert runs_to_delete(runs, 2, {"/o/runs/r2"}) == ["/o/runs/r1", "/o/runs/r3"]
    assert runs_to_delete(runs, 0, set()) == []
    assert runs_to_delete(runs, 9, set()) == []


def test_apply_retention_on_an_empty_output(tmp_path):
    assert apply_retention(str(tmp_path), 1, str(tmp_path / "runs" / "x")) == []


def test_classify():
    prev = PreviousVector("h1", "fp", np.zeros(2, np.float32), ("text",), 0)
    item = CatalogItem("x", title="t")
    assert classify(None, prev, None, "fp") == "deleted"
    assert classify(item, None, "h1", "fp") == "new"
    assert classify(item, prev, "h1", "fp") == "reused"
    assert classify(item, prev, "h2", "fp") == "changed"
    assert classify(item, prev, None, "fp") == "changed"  # unreadable media: re-encode, never reuse
    assert classify(item, prev, "h1", "other") == "changed"
    ids_only = PreviousVector("h1", "fp", None, ("text",), 0)
    assert classify(item, ids_only, "h1", "fp") == "changed"  # previous run not reusable


def test_check_compatible():
    meta = {"model_fingerprint": "fp", "layout": [{"space": "clip", "dim": 16, "offset": 0}]}
    manifest = dict(meta, embeddings={"dtype": "float32"})
    assert check_compatible(Manifest.from_dict(manifest), meta, "float32") == ""
    assert "dtype" in check_compatible(Manifest.from_dict(manifest), meta, "float16")
    assert "fingerprint" in check_compatible(Manifest.from_dict(dict(manifest, model_fingerprint="x")), meta, "float32")
    assert "layout" in check_compatible(Manifest.from_dict(dict(manifest, layout=[])), meta, "float32")


def test_bytes_token_sees_same_size_rewrites_metadata_reads_no_bytes(tmp_path, monkeypatch):
    path = tmp_path / "x.jpg"
    path.write_bytes(b"\xff\xd8\xff" + b"a" * 100)
    before = media_token(str(path), "bytes")
    path.write_bytes(b"\xff\xd8\xff" + b"b" * 100)  # same size
    assert media_token(str(path), "bytes") != before
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    meta = media_token(str(path), "metadata")

    def no_reads(*_, **__):
        raise AssertionError("metadata change detection read the bytes")

    monkeypatch.setattr(incremental, "fetch_bytes", no_reads)
    assert media_token(str(path), "metadata") == meta and meta.startswith("meta:103:")
    os.utime(path, ns=(2_000_000_000, 2_000_000_000))
    assert media_token(str(path), "metadata") != meta
    with pytest.raises(MediaError):
        media_token(str(tmp_path / "missing.jpg"), "metadata")


def test_unreadable_media_gives_no_hash(tmp_path):
    item = CatalogItem("x", title="t", image_uris=("missing.jpg",), base_uri=str(tmp_path))
    assert hash_item(item, "fp", "bytes", FetchPolicy()) is None
    assert hash_item(CatalogItem("y", title="t"), "fp", "bytes", FetchPolicy()) is not None


def test_config_validation():
    with pytest.raises(ValueError, match="change_detection 'mtime' is not one of"):
        IncrementalConfig(change_detection="mtime")
    with pytest.raises(ValueError, match="keep_runs"):
        IncrementalConfig(keep_runs=-1)


@pytest.mark.slow
def test_sample_rerun_reuses_every_item_including_audio(tmp_path, tiny_text_dir):
    """The sample (images, text, spoken audio through the packaged Whisper): a second night reuses all."""
    sample = os.path.join(os.path.dirname(__file__), "..", "sample_catalog", "catalog.parquet")
    first, _, _ = run(sample, tmp_path, "night1", tiny_text_dir)
    second, manifest, result = run(sample, tmp_path, "night2", tiny_text_dir)
    inc = manifest["counts"]["incremental"]
    assert inc["reused"] == first.num_rows and inc["encoded"] == 0
    assert encoder_seconds(result) == 0
    assert np.array_equal(vectors_of(first), vectors_of(second))
    assert first.column("transcript").to_pylist() == second.column("transcript").to_pylist()
    assert any(t for t in second.column("transcript").to_pylist())  # the spoken items kept their transcripts
    assert first.column("content_hash").to_pylist() == second.column("content_hash").to_pylist()


def test_many_join_buckets_give_the_same_nightly_result(nightly, tiny_text_dir, tmp_path):
    """--items_per_batch 1 splits the join into 2 buckets (8 rows): same vectors, hashes and counts as 1 bucket."""
    reference, ref_manifest, _ = nightly["day2"]
    day1_dir = os.path.join(str(nightly["out"]), "runs", "day1")
    table, manifest, _ = run(nightly["catalog"], tmp_path, "day2-buckets", tiny_text_dir,
                             "--previous_run", day1_dir, "--items_per_batch", "1")
    assert join_buckets(8, 1) == 2
    assert _inc(manifest) == _inc(ref_manifest)
    assert table.column("item_id").to_pylist() == reference.column("item_id").to_pylist()
    assert np.array_equal(vectors_of(table), vectors_of(reference))
    assert table.column("content_hash").to_pylist() == reference.column("content_hash").to_pylist()
    assert table.column("title").to_pylist() == reference.column("title").to_pylist()


def test_the_join_carries_ids_and_hashes_never_a_vector(nightly):
    """What the previous run contributes to the join: lists of strings per bucket, no vector column read."""
    day1_dir = os.path.join(str(nightly["out"]), "runs", "day1")
    shards = sorted(glob.glob(os.path.join(day1_dir, "embeddings", "*.parquet")))
    for chunk in incremental.read_hashes(shards[0]):
        assert chunk.column_names == ["item_id", "content_hash", "model_fingerprint"]
    reader = incremental._ReadHashes(incremental.PREVIOUS, True, 3)
    out = [e for path in shards for e in reader.process(path)]
    seen = []
    for bucket, (tag, (path, reusable, ids, hashes, fps)) in out:
        assert tag == incremental.PREVIOUS and path in shards and reusable is True and 0 <= bucket < 3
        assert all(isinstance(v, str) for v in (*ids, *hashes, *fps)) and len(ids) == len(hashes) == len(fps)
        assert all(bucket_of(i, 3) == bucket for i in ids)
        seen += ids
    assert sorted(seen) == list("abcdefgh") and len(out) <= 3 * len(shards)


def test_no_per_item_element_between_read_and_the_encode_batches(tmp_path):
    """3000 items in 3 row groups, 3 buckets: a few elements reach the join, and it emits batches of <= 256."""
    from apache_beam.testing.util import assert_that, equal_to

    from pipeline.config import ReadConfig
    from pipeline.stages.read import ReadCatalog
    from schemas.embeddings import embeddings_schema

    rows = [_row(f"item-{i:05d}", f"title {i}") for i in range(3000)] + [_row("item-00007", "duplicate")]
    path = os.path.join(str(tmp_path), "catalog.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA), path, row_group_size=1000)
    buckets = join_buckets(len(rows), 256)
    assert buckets == 3
    with beam.Pipeline() as p:
        read = p | ReadCatalog(ReadConfig(catalog=path), modalities=frozenset({"text"}), num_buckets=buckets)
        joined = read.items | incremental.Incremental(
            incremental.IncrementalConfig(previous_run="none"), None, "fp", FetchPolicy(), frozenset(),
            schema=embeddings_schema(4), batch_items=256, num_buckets=buckets)
        sizes = read.items | "JoinInput" >> beam.Map(lambda e: (e[1][0], len(e[1][1])))
        assert_that(sizes | "Elements" >> beam.combiners.Count.Globally(),
                    lambda n: _check(n[0] <= 4 * buckets, n), label="FewJoinElements")
        assert_that(sizes | beam.Values() | "Items" >> beam.CombineGlobally(sum), equal_to([3001]), label="AllItems")
        batches = joined.encode | beam.Map(len)
        assert_that(batches | "MaxBatch" >> beam.CombineGlobally(max), equal_to([256]), label="BatchCap")
        assert_that(batches | "Encoded" >> beam.CombineGlobally(sum), equal_to([3000]), label="Encoded")
        assert_that(batches | "Batches" >> beam.combiners.Count.Globally(),
                    lambda n: _check(n[0] <= 3000 // 256 + buckets, n), label="FewBatches")
        assert_that(joined.dead | beam.Map(lambda d: (d.item_id, d.reason.value)),
                    equal_to([("item-00007", "duplicate_id")]), label="Duplicate")
        assert_that(joined.sample | "Samples" >> beam.combiners.Count.Globally(),
                    lambda n: _check(1 <= n[0] <= buckets, n), label="AtMostOneSampleListPerBucket")


def _check(ok: bool, got) -> None:
    if not ok:
        raise AssertionError(got)


def test_graph_with_a_previous_run_has_three_data_shuffles_none_of_a_vector(nightly, tiny_text_dir):
    """The join by id bucket, the ids-only reuse lookup by file, the shard writes; nothing else moves rows."""
    argv = tiny_run_argv(nightly["catalog"], nightly["out"], "graph-only", tiny_text_dir, command=False)
    options = PipelineOptions(argv)
    config, _ = to_run_config(options.view_as(CatalogIndexOptions))
    p = beam.Pipeline(options=options)
    build(p, config)  # previous run: LATEST (day2), reusable
    proto = p.to_runner_api()
    shuffles = sorted(t.unique_name for t in proto.components.transforms.values()
                      if t.spec.urn == "beam:transform:group_by_key:v1")
    data = [s for s in shuffles if not s.startswith(("Publish/", "Index/")) and "Count" not in s
            and "CombineGlobally" not in s and "/Combine" not in s and "/Spread" not in s]
    assert data == ["Incremental/JoinByIdBucket", "Incremental/ReuseByFile", "WriteDeadLetters/GroupByShard",
                    "WriteEmbeddings/GroupByShard"], data


def test_reuse_lookup_reads_the_rows_where_they_lie_and_refuses_a_missing_id(nightly):
    day1_dir = os.path.join(str(nightly["out"]), "runs", "day1")
    shard = sorted(glob.glob(os.path.join(day1_dir, "embeddings", "*.parquet")))[0]
    stored = pq.read_table(shard)
    schema = pq.read_schema(shard)
    ids = stored.column("item_id").to_pylist()[:2]
    requests = {i: (i, f"hash-{i}", '{"x": 1}', f"title {i}", None) for i in ids}
    got = pa.concat_tables(list(incremental.read_reused_rows(shard, requests, schema, "fp-now"))).sort_by("item_id")
    want = stored.filter(pa.compute.is_in(stored.column("item_id"), value_set=pa.array(ids))).sort_by("item_id")
    assert got.schema.equals(schema) and got.column("item_id").to_pylist() == sorted(ids)
    assert np.array_equal(vectors_of(got), vectors_of(want))  # the stored vectors, unchanged
    assert got.column("content_hash").to_pylist() == [f"hash-{i}" for i in sorted(ids)]  # today's fields
    assert set(got.column("model_fingerprint").to_pylist()) == {"fp-now"}
    assert got.column("title").to_pylist() == [f"title {i}" for i in sorted(ids)]
    with pytest.raises(RuntimeError, match="1 of 3 items to reuse are not in"):
        list(incremental.read_reused_rows(shard, dict(requests, gone=("gone", "h", None, "t", None)), schema, "fp"))
