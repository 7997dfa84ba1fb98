"""The whole Beam pipeline on the sample catalog and on broken catalogs, with tiny models."""
from __future__ import annotations

import glob
import io
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import cli
from schemas.catalog import CATALOG_SCHEMA
from schemas.embeddings import read_metadata, vectors_of

TINY_CLIP = os.path.join(os.path.dirname(__file__), "data", "tiny-clip.json")


def run(catalog, out, run_id, text_dir, *extra):
    argv = ["run", "--catalog", catalog, "--output", str(out), "--run_id", run_id,
            "--clip_model", TINY_CLIP, "--clip_weights", "random", "--text_model", text_dir,
            "--device", "cpu", "--batch_size", "8", "--progress_interval_s", "0", *extra]
    assert cli.main(argv) == 0
    run_dir = os.path.join(str(out), "runs", run_id)
    files = sorted(glob.glob(os.path.join(run_dir, "embeddings", "*.parquet")))
    table = pa.concat_tables([pq.read_table(f) for f in files]).sort_by("item_id")
    dead = pa.concat_tables([pq.read_table(f) for f in glob.glob(os.path.join(run_dir, "dead_letter", "*.parquet"))])
    with open(os.path.join(run_dir, "manifest.json")) as f:
        manifest = json.load(f)
    return table, dead, manifest, files


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, sample_catalog, tiny_text_dir):
    out = tmp_path_factory.mktemp("out")
    return out, run(sample_catalog, out, "first", tiny_text_dir)


def test_sample_run_embeds_every_item_with_content(sample_run, sample_catalog):
    out, (table, dead, manifest, files) = sample_run
    catalog = pq.read_table(sample_catalog).to_pylist()
    usable = [r for r in catalog if r["title"] or r["description"] or r["image_uris"]]
    assert table.num_rows == len(usable) == manifest["counts"]["embedded"]
    counts = dict(manifest["counts"])
    incremental = counts.pop("incremental")
    assert counts == {"input_rows": len(catalog), "embedded": len(usable), "dead_letters": {}, "skipped": 0}
    assert (incremental["new"], incremental["encoded"], incremental["reused"]) == (len(usable), len(usable), 0)
    assert dead.num_rows == 0
    norms = np.linalg.norm(vectors_of(table), axis=1)
    assert np.all(np.abs(norms - 1) < 1e-5)
    by_id = {r["item_id"]: r for r in catalog}
    for row in table.drop(["vector"]).to_pylist():
        src = by_id[row["item_id"]]
        expected = sorted(({"text"} if (src["title"] or src["description"]) else set())
                          | ({"image"} if src["image_uris"] else set()))
        assert row["modalities"] == expected
        assert row["num_images"] == len(src["image_uris"] or [])
    with open(os.path.join(str(out), "LATEST")) as f:
        assert f.read().strip() == "first"


def test_schema_and_metadata(sample_run, tiny_text_dir):
    _, (table, _, manifest, files) = sample_run
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 16 + 32)
    meta = read_metadata(files[0])
    assert meta["dim"] == 48 and meta["dtype"] == "float32"
    assert [b["space"] for b in meta["layout"]] == ["clip", "text"]
    assert meta["models"]["clip"]["weights_label"] == "random"
    assert meta["models"]["text"]["weights"] == "pretrained"
    assert meta["fusion"]["mode"] == "mean"
    assert set(table.column("model_fingerprint").to_pylist()) == {meta["model_fingerprint"]}
    assert manifest["models"] == meta["models"]
    assert all(os.path.exists(os.path.join(os.path.dirname(os.path.dirname(files[0])), f["path"]))
               for f in manifest["files"])


def test_rerun_gives_identical_vectors(sample_run, sample_catalog, tiny_text_dir, tmp_path):
    _, (first, *_) = sample_run
    second, *_ = run(sample_catalog, tmp_path, "second", tiny_text_dir, "--batch_size", "5")
    assert first.column("item_id").to_pylist() == second.column("item_id").to_pylist()
    assert np.array_equal(vectors_of(first), vectors_of(second))
    assert first.column("content_hash").to_pylist() == second.column("content_hash").to_pylist()


@pytest.mark.slow
def test_multi_processing_direct_runner_matches_in_memory(sample_run, sample_catalog, tiny_text_dir, tmp_path):
    _, (first, *_) = sample_run
    table, _, manifest, _ = run(sample_catalog, tmp_path, "mp", tiny_text_dir,
                                "--direct_running_mode=multi_processing", "--direct_num_workers=2")
    assert manifest["counts"]["embedded"] == first.num_rows
    assert np.array_equal(vectors_of(first), vectors_of(table))


@pytest.mark.slow
def test_portable_runner_with_embedded_job_server(sample_run, sample_catalog, tiny_text_dir, tmp_path):
    _, (first, *_) = sample_run
    table, _, _, _ = run(sample_catalog, tmp_path, "portable", tiny_text_dir,
                         "--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK")
    assert np.array_equal(vectors_of(first), vectors_of(table))


def test_fixed_shard_count_and_float16(sample_run, sample_catalog, tiny_text_dir, tmp_path):
    _, (first, *_) = sample_run
    table, _, manifest, files = run(sample_catalog, tmp_path, "sharded", tiny_text_dir,
                                    "--num_shards", "3", "--vector_dtype", "float16")
    assert [os.path.basename(f) for f in files] == [f"part-0000{i}-of-00003.parquet" for i in range(3)]
    for f in files:
        ids = pq.read_table(f).column("item_id").to_pylist()
        assert ids == sorted(ids)
    assert table.schema.field("vector").type == pa.list_(pa.float16(), 48)
    np.testing.assert_allclose(vectors_of(table), vectors_of(first), atol=2e-3)


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), color).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture()
def broken_catalog(tmp_path):
    """Two catalog files: one with assorted bad rows, one whose title column has the wrong type."""
    cat = tmp_path / "catalog"
    (cat / "img").mkdir(parents=True)
    (cat / "img" / "ok.jpg").write_bytes(_jpeg((10, 200, 10)))
    (cat / "img" / "corrupt.jpg").write_bytes(_jpeg((1, 2, 3))[:80])
    (cat / "img" / "notes.txt").write_bytes(b"plain text, not an image")
    rows = [
        {"item_id": "good", "title": "green mug", "description": None, "image_uris": ["img/ok.jpg"], "audio_uri": None},
        {"item_id": "text-only", "title": "blue bag", "description": "canvas", "image_uris": None, "audio_uri": None},
        {"item_id": "good", "title": "duplicate", "description": None, "image_uris": None, "audio_uri": None},
        {"item_id": "missing-img", "title": "lamp", "description": None, "image_uris": ["img/nope.jpg"], "audio_uri": None},
        {"item_id": "corrupt-img", "title": "cup", "description": None, "image_uris": ["img/corrupt.jpg"], "audio_uri": None},
        {"item_id": "not-image", "title": "doc", "description": None, "image_uris": ["img/notes.txt"], "audio_uri": None},
        {"item_id": "half-broken", "title": "pair", "description": None,
         "image_uris": ["img/ok.jpg", "img/nope.jpg"], "audio_uri": None},
        {"item_id": "empty", "title": "  ", "description": None, "image_uris": [], "audio_uri": None},
        {"item_id": "", "title": "no id", "description": None, "image_uris": None, "audio_uri": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA), cat / "part-a.parquet")
    pq.write_table(pa.table({"item_id": ["typed"], "title": [123]}), cat / "part-b.parquet")
    return str(cat / "*.parquet"), len(rows) + 1


def test_bad_rows_become_dead_letters_and_counts_add_up(broken_catalog, tiny_text_dir, tmp_path):
    pattern, n_rows = broken_catalog
    table, dead, manifest, _ = run(pattern, tmp_path, "bad", tiny_text_dir)
    assert table.column("item_id").to_pylist() == ["good", "text-only"]
    fates = {(r["item_id"], r["reason"]) for r in dead.to_pylist()}
    assert fates >= {("good", "duplicate_id"), ("missing-img", "missing_media"), ("corrupt-img", "decode_failed"),
                     ("not-image", "unsupported_format"), ("half-broken", "missing_media"),
                     ("empty", "empty_item"), ("typed", "invalid_row")}
    assert any(r["reason"] == "invalid_row" and "'item_id'" in r["detail"] for r in dead.to_pylist())
    counts = manifest["counts"]
    assert counts["input_rows"] == n_rows
    assert counts["embedded"] + sum(counts["dead_letters"].values()) == n_rows
    assert all(r["source"] for r in dead.to_pylist())
    typed = [r for r in dead.to_pylist() if r["item_id"] == "typed"][0]
    assert "column 'title' expected string or null, got int 123" in typed["detail"]


def test_drop_media_policy_embeds_what_is_left(broken_catalog, tiny_text_dir, tmp_path):
    pattern, _ = broken_catalog
    table, dead, _, _ = run(pattern, tmp_path, "drop", tiny_text_dir, "--media_errors", "drop_media")
    rows = {r["item_id"]: r for r in table.drop(["vector"]).to_pylist()}
    assert rows["half-broken"]["num_images"] == 1 and rows["half-broken"]["modalities"] == ["image", "text"]
    assert rows["missing-img"]["modalities"] == ["text"]


def test_missing_catalog_is_a_clear_error(tmp_path, tiny_text_dir):
    with pytest.raises(Exception, match="nothing-here"):
        run(str(tmp_path / "nothing-here" / "*.parquet"), tmp_path, "none", tiny_text_dir)
    assert not os.path.exists(tmp_path / "LATEST")


def test_run_help_lists_options(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["run", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--catalog", "--output", "--clip_model", "--text_model", "--device", "--batch_size", "--preset"):
        assert flag in text
