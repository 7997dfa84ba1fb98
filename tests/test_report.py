"""report.html: charts, escaping, every section from synthetic manifests, and the report's data gathering."""
from __future__ import annotations

import io
import json
import re

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from pipeline.report import data as report_data, sample as report_sample, stats as report
from pipeline.stages.publish import RunSummary, SmallestSample
from pipeline.report.charts import bar_chart, histogram_chart, line_chart
from pipeline.report.render import index_candidates
from pipeline.stages.stage_metrics import StageTimer, stage_timings
from schemas.catalog import CatalogItem
from schemas.manifest import IndexInfo, Manifest

EVIL = "<script>window.pwned=1</script>&\"'"


def _base_manifest(**extra) -> dict:
    stats = report.empty_stats()
    for i in range(10):
        v = np.zeros(4, np.float32)
        v[i % 4] = 1.0
        report.add_record(stats, ("image", "text") if i % 2 else ("text",), v, i % 2)
    manifest = {
        "run_id": "r2", "catalog": "cat/" + EVIL, "created_at": "2026-12-01T00:00:00+00:00",
        "counts": {"input_rows": 13, "embedded": 10, "dead_letters": {"decode_failed": 2, "missing_media": 1},
                   "skipped": 0, "skipped_by_reason": {},
                   "incremental": {"reused": 7, "encoded": 3, "new": 1, "changed": 2, "deleted": 1,
                                   "previous_run": {"run_id": "r1", "run_dir": "x", "reusable": True},
                                   "change_detection": "bytes"}},
        "models": {"clip": {"family": "open_clip", "name": EVIL, "weights": "random", "weights_label": "random"}},
        "stats": report.finish_stats(stats),
        "index": {"kind": "ivfpq", "factory": "IVF16,PQ8", "metric": "ip", "ntotal": 10, "shards": [{}],
                  "bytes_per_vector": 8,
                  "recall": {"k": 10, "queries": 5, "held_out": True, "ground_truth": "exact", "target_recall": 0.9,
                             "recommended_nprobe": 4, "target_reached": True,
                             "table": [{"nprobe": n, "recall_10_at_10": r, "recall_1_at_1": r, "ms_per_query": 0.1,
                                        "single_query_ms_p50": 0.2} for n, r in ((1, 0.5), (4, 0.92), (16, 1.0))]}},
    }
    manifest.update(extra)
    return manifest


CANDIDATES = [
    {"name": "HNSW32", "family": "hnsw", "bytes_per_vector": 640, "memory_bytes": 6400, "fits_budget": True,
     "skipped_reason": None, "train_seconds": 0.1, "meets_target": True, "best_setting": {"params": {"efSearch": 32}},
     "settings": [{"params": {"efSearch": e}, "query_set": "held_out", "recall_at_10": r, "recall_at_1": r,
                   "ms_per_query_batch": 0.1, "ms_single_p50": 0.2} for e, r in ((16, 0.8), (32, 0.95), (64, 0.99))]},
    {"name": "IVF16,PQ8", "family": "ivfpq", "bytes_per_vector": 8, "memory_bytes": 80, "fits_budget": True,
     "skipped_reason": None, "train_seconds": 0.3, "meets_target": False, "best_setting": None,
     # measured on both query sets: the curve shows the held-out one
     "settings": [{"params": {"nprobe": n}, "query_set": q, "recall_at_10": r, "recall_at_1": None,
                   "ms_per_query_batch": 0.1, "ms_single_p50": 0.2}
                  for n, r in ((1, 0.4), (4, 0.7)) for q in ("held_out", "recall_queries")]},
    {"name": "Flat", "family": "flat", "bytes_per_vector": 16, "memory_bytes": 10 ** 12, "fits_budget": False,
     "skipped_reason": "over the memory budget " + EVIL, "settings": []},
]


def _data() -> dict:
    jpeg = report_sample.make_thumbnail(Image.new("RGB", (300, 200), (200, 30, 30)))
    uri = report_data._data_uri(jpeg)
    tile = {"item_id": "i" + EVIL, "title": EVIL, "modalities": ["image", "text"], "thumbnail": uri}
    return {
        "gallery": {"items": [dict(tile, neighbours=[dict(tile, score=0.9),
                                                     {"item_id": "t1", "title": "text only", "modalities": ["text"],
                                                      "score": 0.5},
                                                     {"item_id": "far", "title": None, "modalities": [], "score": 0.1,
                                                      "sampled": False}])],
                    "k": 5, "nprobe": 4, "metric": "ip", "score": "inner product", "sample": "1 item"},
        "dead_letter_examples": {"decode_failed": [{"item_id": EVIL, "stage": "decode", "detail": EVIL,
                                                    "source": "img/" + EVIL}]},
        "previous_counts": {"run_id": "r1", "input_rows": 12, "embedded": 9, "dead_letters": 3, "skipped": 0,
                            "reused": 0, "encoded": 9, "new": 9, "changed": 0, "deleted": 0},
        "drift": {"changed": 2, "sampled": 2, "min": 0.5, "median": 0.7, "max": 0.9,
                  "histogram": report_data.histogram(np.array([0.5, 0.9]), 0.0, 1.0, 20)},
    }


TIMINGS = {"run_wall_s": 10.0, "encoder_wall_s": 4.0, "encoder_busy_share": 0.4,
           "stages": {"read": {"wall_s": 0.5, "cpu_s": 0.4, "items": 13, "batches": 1, "items_per_s": 26.0},
                      "encode": {"wall_s": 4.0, "cpu_s": None, "items": 20, "batches": 3, "items_per_s": 5.0}},
           "encoders": {"image": {"wall_s": 3.0, "batches": 2}, "text": {"wall_s": 1.0, "batches": 1}}}


def _no_markup_from_catalog(page: str, escaped_copies: int) -> None:
    assert "<script" not in page.lower()
    assert page.count("&lt;script&gt;window.pwned=1&lt;/script&gt;") >= escaped_copies
    # no external assets: every src is inline data, no link or url() to anywhere
    assert all(src.startswith("data:image/") for src in re.findall(r'src="([^"]*)"', page))
    assert not re.search(r"<link|url\(|https?://(?!www\.w3\.org/2000/svg)", page)


def test_every_section_renders_from_a_full_manifest_and_catalog_text_stays_text():
    manifest = _base_manifest(timings=TIMINGS)
    manifest["index"].update(candidates=CANDIDATES, chosen={"name": "HNSW32", "params": {"efSearch": 32},
                                                              "why": "fewest bytes reaching the target"})
    page = report.render_html(Manifest.from_dict(manifest), _data())
    for heading in ("Where the time went", "Nearest neighbours", "Dead letters", "Modality coverage",
                    "Vector norm check", "Index", "Incremental", "How far changed items"):
        assert heading in page
    _no_markup_from_catalog(page, 8)
    assert "encoders busy <b>40%</b>" in page
    # a chart per measured candidate, the chosen one marked on its own curve; the skipped one in the table
    assert page.count("<polyline") == 3  # HNSW recall@10 and @1, IVF recall@10 (no @1 measured), none for Flat
    assert sorted(len(p.split()) for p in re.findall(r'<polyline points="([^"]*)"', page)) == [2, 3, 3]
    assert page.count(">chosen</text>") == 1 and "HNSW32 (hnsw) &mdash; chosen" in page
    assert "over the memory budget &lt;script&gt;" in page
    assert page.count("<img ") == 2 and "text only" in page and "not in the report sample" in page
    assert "previous (r1)" in page and "median 0.7" in page


def test_an_old_manifest_without_data_renders_with_not_recorded_notes():
    manifest = _base_manifest()
    page = report.render_html(Manifest.from_dict(manifest))
    assert "Timings not recorded" in page and "No gallery recorded" in page and "Examples not recorded" in page
    assert "Drift not recorded" in page
    # today's single index becomes one candidate, its recommended nprobe marked
    candidates, chosen = index_candidates(IndexInfo.from_dict(manifest["index"]))
    assert len(candidates) == 1 and chosen["params"] == {"nprobe": 4}
    assert page.count(">chosen</text>") == 1
    _no_markup_from_catalog(page, 2)  # the catalog path and the model name


def test_a_flat_index_has_one_exact_point():
    manifest = _base_manifest()
    manifest["index"].update(kind="flat", factory="Flat")
    manifest["index"]["recall"].update(recommended_nprobe=None, table=[
        {"nprobe": None, "recall_10_at_10": 1.0, "recall_1_at_1": 1.0, "ms_per_query": 0.1, "single_query_ms_p50": 0.1}])
    page = report.render_html(Manifest.from_dict(manifest), {})
    assert ">exact</text>" in page and page.count(">chosen</text>") == 1


def test_charts_escape_labels_and_scale_bars():
    svg = bar_chart([(EVIL, [10]), ("b", [5])], unit=" s")
    assert "<script" not in svg and "&lt;script&gt;" in svg
    widths = [float(w) for w in re.findall(r'<rect x="150" y="\d+" width="([\d.]+)"', svg)]
    assert widths[0] == pytest.approx(2 * widths[1])
    assert "<script" not in histogram_chart([0, 0.5, 1], [1, 3], x_label=EVIL)
    assert "<script" not in line_chart([{"name": EVIL, "points": [(1, 0.5, EVIL)], "marked": 0}])


def test_norm_histogram_counts_off_unit_vectors():
    stats = report.empty_stats()
    report.add_record(stats, ("text",), np.array([1.0, 0.0]))
    report.add_record(stats, ("text",), np.array([1.05, 0.0]))
    report.add_record(stats, ("text",), np.array([np.nan, 0.0]))
    merged = report.finish_stats(report.merge_stats([stats, report.empty_stats()]))
    hist = merged["norm"]["deviation_histogram"]
    assert hist["<=1e-6"] == 1 and hist[">1e-2"] == 1 and hist["non-finite"] == 1 and merged["norm"]["off_unit"] == 2


def test_thumbnails_are_size_capped_jpegs():
    jpeg = report_sample.make_thumbnail(Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 600, 3),
                                                                                           dtype=np.uint8)))
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and max(image.size) == report_sample.THUMB_SIDE
    assert len(jpeg) <= report_sample.THUMB_MAX_BYTES
    assert report_sample.make_thumbnail(Image.new("RGB", (50, 50)), max_bytes=10) is None
    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (0, 128, 0)).save(buffer, format="JPEG")
    small = Image.open(io.BytesIO(report_sample.thumbnail_from_bytes(buffer.getvalue(), 10 ** 8)))
    assert max(small.size) == report_sample.THUMB_SIDE
    assert report_sample.thumbnail_from_bytes(b"not an image", 10 ** 8) is None
    pending = report_sample.PendingThumbnails(report_sample.LocalBound())
    pending.add("item-0", "not an image")  # the embed stage's hook never raises: only the tile loses its photo
    assert len(pending) == 0 and pending.flush() == []


def test_the_sample_is_the_smallest_hashes_whatever_the_order_or_partition():
    ids = [f"item-{i}" for i in range(300)]
    expected = sorted(ids, key=report_sample.sample_key)[:20]
    bound = report_sample.LocalBound(20)
    offered = [i for i in ids if bound.offer(i)]
    assert set(expected) <= set(offered) and len(offered) < 120  # few thumbnails made past the first 20
    # in lists, as the join emits each bucket's candidates; some ids twice (a retried bundle's output)
    entries = [report_sample.sample_item(CatalogItem(i, title=f"t {i}")) for i in ids + ids[:50]]
    items = [entries[k:k + 7] for k in range(0, len(entries), 7)]
    combine = SmallestSample(20)
    parts = [combine.add_inputs(combine.create_accumulator(), items[k::3]) for k in range(3)]
    picked = combine.extract_output(combine.merge_accumulators(parts))
    assert [s.item_id for s in picked] == expected and picked[0].title == f"t {expected[0]}"


def test_pending_thumbnails_are_encoded_only_for_the_candidates_left_in_the_bound():
    """Only the bound's survivors become JPEGs at flush, the same bytes make_thumbnail gives; memory bounded."""
    rng = np.random.default_rng(3)
    ids = [f"item-{i}" for i in range(400)]
    images = {i: Image.fromarray(rng.integers(0, 255, (32 + k % 50, 40, 3), dtype=np.uint8)) for k, i in enumerate(ids)}
    bound = report_sample.LocalBound(20)
    pending = report_sample.PendingThumbnails(bound, size=20)
    most = 0
    for i in ids:
        if bound.offer(i):
            pending.add(i, images[i])
        most = max(most, len(pending))
    assert most <= 41  # pruned past 2 * size
    got = pending.flush()
    expected = sorted(ids, key=report_sample.sample_key)[:20]
    assert [t.item_id for t in got] == expected and [t.key for t in got] == sorted(t.key for t in got)
    assert all(t.jpeg == report_sample.make_thumbnail(images[t.item_id]) for t in got)
    assert pending.flush() == [] and len(pending) == 0
    pending.add("broken", "not an image")  # a failed shrink costs only the tile
    assert len(pending) == 0


def test_run_summary_adds_each_part_whatever_the_partition():
    items = [report_sample.sample_item(CatalogItem(f"id{i:03d}", title="t")) for i in range(30)]
    tagged = ([("rows", 10)] * 5 + [("embedded", 9)] * 5 + [("encoded", 4), ("encoded", 5)]
              + [("dead", "fetch_failed"), ("dead", "decode_failed"), ("dead", "fetch_failed")]
              + [("skipped", "duplicate_id")] + [("statuses", {"new": 3, "changed": 1}), ("statuses", {"new": 2})]
              + [("embedding_files", f"e{i}") for i in range(3)] + [("dead_files", "d0")]
              + [("sample", items[k:k + 6]) for k in range(0, 30, 6)])
    combine = RunSummary()
    whole = combine.extract_output(combine.add_inputs(combine.create_accumulator(), tagged))
    parts = [combine.add_inputs(combine.create_accumulator(), tagged[k::4]) for k in range(4)]
    merged = combine.extract_output(combine.merge_accumulators(parts))
    for summary in (whole, merged):
        assert (summary["rows"], summary["embedded"], summary["encoded"]) == (50, 45, 9)
        assert summary["dead"] == {"fetch_failed": 2, "decode_failed": 1} and summary["skipped"] == {"duplicate_id": 1}
        assert summary["statuses"] == {"new": 5, "changed": 1}
        assert sorted(summary["embedding_files"]) == ["e0", "e1", "e2"] and summary["dead_files"] == ["d0"]
        assert [s.item_id for s in summary["sample"]] == [s.item_id for s in report_sample.smallest(items, 30)]
        assert summary["thumbnails"] == [] and summary["stats"] == report.finish_stats(report.empty_stats())


def _shard(path, ids, vectors, hashes):
    pq.write_table(pa.table({"item_id": ids, "vector": pa.FixedSizeListArray.from_arrays(
        pa.array(np.asarray(vectors, np.float32).ravel()), vectors.shape[1]), "content_hash": hashes,
        "modalities": [["text"]] * len(ids)}), path, row_group_size=4)
    return str(path)


def test_drift_reads_only_changed_items_and_caps_them(tmp_path):
    rng = np.random.default_rng(1)
    ids = [f"i{j:02d}" for j in range(10)]
    old = rng.normal(size=(10, 8))
    new = old.copy()
    new[:4] = -old[:4]  # four changed items, pointing the other way
    before = _shard(tmp_path / "a.parquet", ids, old, ["h"] * 10)
    after = _shard(tmp_path / "b.parquet", ids + ["new"], np.vstack([new, rng.normal(size=(1, 8))]),
                   ["x"] * 4 + ["h"] * 6 + ["n"])
    drift = report_data.vector_drift([before], [after])
    assert drift["changed"] == drift["sampled"] == 4 and drift["max"] == pytest.approx(-1.0, abs=1e-4)
    assert sum(drift["histogram"]["counts"]) == 4 and drift["histogram"]["edges"][0] == -1.0
    capped = report_data.vector_drift([before], [after], cap=2)
    assert capped["changed"] == 4 and capped["sampled"] == 2
    rows = report_data.read_rows([after], {"i05", "new"}, ["vector"])
    np.testing.assert_allclose(rows["i05"]["vector"], new[5].astype(np.float32))


def test_dead_letter_examples_keep_five_per_reason(tmp_path):
    from pipeline.stages.write import dead_letters_to_table
    from schemas.dead_letter import DeadLetter, Reason, Stage

    rows = [DeadLetter(f"d{j:02d}", Stage.DECODE, Reason.DECODE_FAILED, f"bad {j}", f"img{j}.jpg") for j in range(8)]
    rows.append(DeadLetter("v", Stage.VALIDATE, Reason.INVALID_ROW, "no id", "cat#3"))
    path = tmp_path / "dead.parquet"
    pq.write_table(dead_letters_to_table(rows), path)
    examples = report_data.dead_letter_examples([str(path)])
    assert [e["item_id"] for e in examples["decode_failed"]] == [f"d{j:02d}" for j in range(5)]
    assert examples["invalid_row"] == [{"item_id": "v", "stage": "validate", "detail": "no id", "source": "cat#3"}]


class _Timed(beam.DoFn):
    def __init__(self):
        self._timer = StageTimer("demo")

    def process(self, batch):
        with self._timer.batch(len(batch)):
            total = sum(x * x for x in batch)
        yield total


def test_stage_timer_records_one_sample_per_batch_read_back_after_the_run():
    p = beam.Pipeline()
    out = p | beam.Create([[1, 2, 3], [4, 5]]) | beam.ParDo(_Timed())
    assert_that(out, equal_to([14, 41]))
    result = p.run()
    result.wait_until_finish()
    demo = stage_timings(result)["demo"]
    assert demo["batches"] == 2 and demo["items"] == 5 and demo["wall_s"] >= 0 and demo["cpu_s"] >= 0
    json.dumps(demo)


def test_gallery_searches_the_runs_own_shards_and_shows_what_the_sample_kept(tmp_path):
    from pipeline.index import indexing

    rng = np.random.default_rng(2)
    ids = [f"item-{j:02d}" for j in range(24)]
    vectors = rng.normal(size=(24, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    (tmp_path / "index").mkdir()
    (tmp_path / "embeddings").mkdir()
    params = indexing.choose_params(24, 8, 24)
    trained = indexing.to_bytes(indexing.train_index(params, vectors))
    files, shards = [], []
    for shard, rows in enumerate((slice(0, 12), slice(12, 24))):
        files.append(_shard(tmp_path / f"embeddings/part-{shard:05d}-of-00002.parquet", ids[rows], vectors[rows],
                            ["h"] * 12))
        index, faiss_ids = indexing.fill_shard(trained, vectors[rows], shard)
        (tmp_path / f"index/shard-{shard:05d}.faiss").write_bytes(indexing.to_bytes(index))
        pq.write_table(indexing.ids_table(faiss_ids, ids[rows]), tmp_path / f"index/ids-{shard:05d}.parquet")
        shards.append({"shard": shard, "index": f"index/shard-{shard:05d}.faiss", "ids": f"index/ids-{shard:05d}.parquet"})
    sample = report_sample.smallest([report_sample.sample_item(CatalogItem(i, title=f"title {i}")) for i in ids[:10]], 10)
    jpeg = report_sample.make_thumbnail(Image.new("RGB", (40, 40), (0, 0, 255)))
    thumbs = {i: jpeg for i in ids[:5]}
    index = IndexInfo.from_dict({"shards": shards, "metric": "ip", "recall": {}})
    g = report_data.gallery(str(tmp_path), index, files, sample, thumbs, size=4)
    assert [e["item_id"] for e in g["items"]] == [s.item_id for s in sample[:4]]
    for entry in g["items"]:
        q = ids.index(entry["item_id"])
        exact = [ids[j] for j in np.argsort(-(vectors @ vectors[q]), kind="stable") if j != q][:5]
        assert [n["item_id"] for n in entry["neighbours"]] == exact
        scores = [n["score"] for n in entry["neighbours"]]
        assert scores == sorted(scores, reverse=True)
        for n in entry["neighbours"]:
            assert ("thumbnail" in n) == (n["item_id"] in thumbs)
            assert n.get("text") == (f"title {n['item_id']}" if n["item_id"] in ids[5:10] else None)  # photo-less
            assert n["title"] == (f"title {n['item_id']}" if n["item_id"] in ids[:10] else None)
            assert n["modalities"] == (["text"])
    assert report_data.gallery(str(tmp_path), None, files, sample, thumbs)["items"] == []


def test_timings_added_after_the_run_rerender_the_report_and_keep_the_manifest_true(tmp_path):
    import hashlib

    from pipeline.stages.publish import add_timings, file_entry, write_report_files
    from pipeline.storage import MANIFEST

    run_dir = str(tmp_path)
    manifest = _base_manifest()
    paths = write_report_files(run_dir, Manifest.from_dict(manifest), _data())
    manifest["files"] = [file_entry(p, run_dir).to_dict() for p in paths]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    before = (tmp_path / "report.html").read_text()
    assert "Timings not recorded" in before
    updated = add_timings(run_dir, TIMINGS)
    after = (tmp_path / "report.html").read_bytes()
    assert b"Where the time went" in after and b"Timings not recorded" not in after and b"encoders busy" in after
    on_disk = json.loads((tmp_path / MANIFEST).read_text())
    assert on_disk == updated.to_dict() and on_disk["timings"] == TIMINGS
    for entry in on_disk["files"]:
        data = (tmp_path / entry["path"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert {e["path"] for e in on_disk["files"]} == {"report/data.json", "report.html"}
