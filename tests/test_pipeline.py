"""The whole Beam pipeline on the sample catalog and on broken catalogs, with tiny models."""
from __future__ import annotations

import glob
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import cli

from pipeline.stages import faults
from pipeline.index.runs import open_run
from schemas.catalog import CATALOG_SCHEMA
from schemas.embeddings import read_metadata, vectors_of
from tests.conftest import TINY_CLIP_JSON, tiny_run_argv

TINY_CLIP = TINY_CLIP_JSON


def run(catalog, out, run_id, text_dir, *extra):
    argv = tiny_run_argv(catalog, out, run_id, text_dir, *extra)
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
    usable = [r for r in catalog if r["title"] or r["description"] or r["image_uris"] or r["audio_uri"]]
    assert table.num_rows == len(usable) == manifest["counts"]["embedded"]
    counts = dict(manifest["counts"])
    incremental = counts.pop("incremental")
    assert counts == {"input_rows": len(catalog), "embedded": len(usable), "dead_letters": {}, "skipped": 0,
                      "skipped_by_reason": {}}
    assert (incremental["new"], incremental["encoded"], incremental["reused"]) == (len(usable), len(usable), 0)
    assert dead.num_rows == 0
    norms = np.linalg.norm(vectors_of(table), axis=1)
    assert np.all(np.abs(norms - 1) < 1e-5)
    by_id = {r["item_id"]: r for r in catalog}
    for row in table.drop(["vector"]).to_pylist():
        src = by_id[row["item_id"]]
        # the tiny random Whisper transcribes every clip to some words (its no-speech probability stays
        # far below the threshold), so every item with audio reaches the text spaces through a transcript;
        # what real speech and a chime give is tests/test_real_weights.py's, with the real Whisper
        expected = sorted(({"text"} if (src["title"] or src["description"]) else set())
                          | ({"image"} if src["image_uris"] else set())
                          | ({"audio"} if src["audio_uri"] else set()))
        assert row["modalities"] == expected
        assert row["num_images"] == len(src["image_uris"] or [])
        assert bool(row["transcript"]) == (src["audio_uri"] is not None), row
    with open(os.path.join(str(out), "LATEST")) as f:
        assert f.read().strip() == "first"
    assert manifest["stats"]["items"] == len(usable) and manifest["stats"]["norm"]["off_unit"] == 0
    assert manifest["stats"]["modalities"]["image"] == sum(1 for r in usable if r["image_uris"])
    meta = read_metadata(files[0])
    assert meta["asr"]["family"] == "asr_transformers" and meta["asr"]["weights_label"] == "random"
    assert {"modality": "audio", "space": "text", "via": "transcript"} in meta["routes"]
    assert manifest["asr"] == meta["asr"]


def test_sample_run_publishes_a_flat_index_with_recall_and_report(sample_run):
    out, (table, _, manifest, _) = sample_run
    run_dir = os.path.join(str(out), "runs", "first")
    index = manifest["index"]
    # 35 vectors cannot train IVF-PQ: an exact flat index, and the manifest says why
    assert index["kind"] == "flat" and "too few" in index["note"] and index["ntotal"] == table.num_rows
    assert [s["index"] for s in index["shards"]] == ["index/shard-00000.faiss"]
    assert index["recall"]["table"][0]["recall_10_at_10"] == 1.0 and index["recall"]["table"][0]["nprobe"] is None
    listed = {f["path"]: f for f in manifest["files"]}
    assert {"index/trained.faiss", "index/shard-00000.faiss", "index/ids-00000.parquet", "report.html"} <= set(listed)
    for path, entry in listed.items():
        with open(os.path.join(run_dir, path), "rb") as f:
            data = f.read()
        assert entry["bytes"] == len(data) and entry["sha256"] == __import__("hashlib").sha256(data).hexdigest()
    with open(os.path.join(run_dir, "report.html")) as f:
        html = f.read()
    assert "Recall self-check" in html and "Modality coverage" in html and "image+text" in html
    # the loader follows LATEST and finds every item as its own nearest neighbour, with exact scores
    run = open_run(str(out))
    vectors = vectors_of(table)
    scores, ids = run.search(vectors, 3)
    assert [row[0] for row in ids] == table.column("item_id").to_pylist()
    exact = np.sort(vectors @ vectors.T, axis=1)[:, ::-1][:, :3]
    np.testing.assert_allclose(scores, exact, atol=1e-5)


def test_crash_before_manifest_leaves_latest_on_the_previous_run(sample_run, sample_catalog, tiny_text_dir,
                                                                 monkeypatch, tmp_path):
    out, _ = sample_run
    monkeypatch.setenv(faults.ENV, f"publish_manifest:raise_once:{tmp_path / 'marker'}")
    with pytest.raises(Exception, match="publish_manifest"):
        run(sample_catalog, out, "crashed", tiny_text_dir)
    crashed = os.path.join(str(out), "runs", "crashed")
    assert os.path.exists(os.path.join(crashed, "index", "shard-00000.faiss"))  # the last shard was written
    assert not os.path.exists(os.path.join(crashed, "manifest.json"))
    with open(os.path.join(str(out), "LATEST")) as f:
        assert f.read().strip() == "first"
    assert open_run(str(out)).run_dir.endswith("/runs/first")


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
    assert (manifest["image_decode"], manifest["image_decode_scaling"]) == ("cpu", "jpeg_draft")
    assert manifest["text_context"] == meta["text_context"] == "length_buckets"
    assert all(os.path.exists(os.path.join(os.path.dirname(os.path.dirname(files[0])), f["path"]))
               for f in manifest["files"])


def test_rerun_gives_identical_vectors(sample_run, sample_catalog, tiny_text_dir, tmp_path):
    _, (first, *_) = sample_run
    second, *_ = run(sample_catalog, tmp_path, "second", tiny_text_dir, "--batch_size", "5")
    assert first.column("item_id").to_pylist() == second.column("item_id").to_pylist()
    assert np.array_equal(vectors_of(first), vectors_of(second))
    assert first.column("content_hash").to_pylist() == second.column("content_hash").to_pylist()


def test_decoding_processes_give_the_vectors_of_the_fetch_threads(sample_run, sample_catalog, tiny_text_dir, tmp_path,
                                                                  monkeypatch):
    """The fetch threads (0, what auto gives the 36-row sample), a pool of 2, and auto where the catalog
    counted as large enough give the sample run's rows."""
    _, (first, first_dead, first_manifest, _) = sample_run
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.options import auto_decode_processes
    from pipeline.stages.decode_pool import DecodePool

    for processes in (0, 2):
        pools: dict = {}
        monkeypatch.setattr(DecodePool, "_pools", pools)  # this run's own pools, whatever earlier tests started
        table, dead, manifest, _ = run(sample_catalog, tmp_path / str(processes), "procs", tiny_text_dir,
                                       "--decode_processes", str(processes))  # own output: nothing to reuse
        assert list(pools) == ([processes] if processes else [])  # the embed stage's pool, if any
        for pool in pools.values():
            pool.shutdown()
        assert table.drop(["vector"]).to_pylist() == first.drop(["vector"]).to_pylist()  # ids, hashes, fields
        assert np.array_equal(vectors_of(first), vectors_of(table))
        assert dead.to_pylist() == first_dead.to_pylist() and manifest["counts"] == first_manifest["counts"]
    from pipeline import options

    for small in (True, False):
        pools = {}
        monkeypatch.setattr(DecodePool, "_pools", pools)
        if not small:
            monkeypatch.setattr(options, "MIN_AUTO_DECODE_ROWS", 1)  # the sample counts as a large catalog
        table, *_ = run(sample_catalog, tmp_path / f"auto-{small}", "auto", tiny_text_dir)  # the default: auto
        auto = 0 if small else auto_decode_processes(PipelineOptions([]))
        assert list(pools) == ([auto] if auto else []) and np.array_equal(vectors_of(first), vectors_of(table))


def test_a_decoding_process_killed_midway_loses_nothing(sample_run, sample_catalog, tiny_text_dir, tmp_path,
                                                         monkeypatch):
    _, (first, *_) = sample_run
    marker = tmp_path / "decode-fault"
    monkeypatch.setenv(faults.ENV, f"decode:exit:{marker}")  # the first chunk's process dies on the spot
    table, dead, manifest, _ = run(sample_catalog, tmp_path, "killed", tiny_text_dir, "--decode_processes", "2")
    assert marker.exists()  # a decoding process was killed
    assert np.array_equal(vectors_of(first), vectors_of(table)) and dead.num_rows == 0
    assert table.column("content_hash").to_pylist() == first.column("content_hash").to_pylist()


@pytest.mark.slow
@pytest.mark.parametrize("decode", [[], ["--decode_processes", "2"]], ids=["threads", "decode-processes"])
def test_multi_processing_direct_runner_matches_in_memory(decode, sample_run, sample_catalog, tiny_text_dir, tmp_path):
    """SDK workers in processes of their own; with --decode_processes, each starts its own decoding pool."""
    _, (first, *_) = sample_run
    table, _, manifest, _ = run(sample_catalog, tmp_path, "mp", tiny_text_dir,
                                "--direct_running_mode=multi_processing", "--direct_num_workers=2", *decode)
    assert manifest["counts"]["embedded"] == first.num_rows
    assert np.array_equal(vectors_of(first), vectors_of(table))


@pytest.mark.slow
def test_portable_runner_with_embedded_job_server(sample_run, sample_catalog, tiny_text_dir, tmp_path):
    _, (first, *_) = sample_run
    table, _, _, _ = run(sample_catalog, tmp_path, "portable", tiny_text_dir,
                         "--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK")
    assert np.array_equal(vectors_of(first), vectors_of(table))


@pytest.mark.slow
def test_portable_runner_with_an_external_worker_pool(sample_run, sample_catalog, tiny_text_dir, tmp_path):
    """How Dataflow Runner v2 runs containers: SDK workers are separate processes started by a worker pool.

    Items, batches and pieces cross process boundaries (pickled), and every DoFn is set up in the pool's
    worker processes, where the models load. Beam's embedded Python job server asks the pool for one worker
    per environment (its FnApiRunner keeps direct_num_workers at 1), so one pool process runs here.
    """
    import socket
    import subprocess
    import sys
    import time

    _, (first, *_) = sample_run
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # the pool starts workers as `python -c ...`: this interpreter's venv first on PATH, the code on PYTHONPATH
    env = dict(os.environ, PYTHONPATH=root, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    pool = subprocess.Popen([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                             f"--service_port={port}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(2)
        table, _, manifest, _ = run(sample_catalog, tmp_path, "pool", tiny_text_dir, "--runner=PortableRunner",
                                    "--job_endpoint=embed", "--environment_type=EXTERNAL",
                                    f"--environment_config=localhost:{port}")
        workers = subprocess.run(["ps", "--ppid", str(pool.pid), "-o", "args="], capture_output=True,
                                 text=True).stdout.splitlines()
    finally:
        pool.terminate()
        pool.wait(timeout=30)
    assert any("SdkHarness" in w for w in workers), workers  # the work ran in the pool's worker processes
    assert manifest["counts"]["embedded"] == first.num_rows
    assert np.array_equal(vectors_of(first), vectors_of(table))


def test_fixed_shard_count_and_float16(sample_run, sample_catalog, tiny_text_dir, tmp_path):
    _, (first, *_) = sample_run
    table, _, manifest, files = run(sample_catalog, tmp_path, "sharded", tiny_text_dir,
                                    "--num_shards", "3", "--vector_dtype", "float16",
                                    "--index_nlist", "4", "--index_m", "4", "--index_nbits", "3", "--merge_index",
                                    "--index_shard_vectors", "12")  # 35 vectors: one index shard per file
    assert [os.path.basename(f) for f in files] == [f"part-0000{i}-of-00003.parquet" for i in range(3)]
    for f in files:
        ids = pq.read_table(f).column("item_id").to_pylist()
        assert ids == sorted(ids)
    assert table.schema.field("vector").type == pa.list_(pa.float16(), 48)
    np.testing.assert_allclose(vectors_of(table), vectors_of(first), atol=2e-3)
    # IVF-PQ forced on 35 vectors: three shards sharing one trained quantizer, plus a merged index
    index = manifest["index"]
    assert (index["kind"], index["factory"], index["ntotal"]) == ("ivfpq", "IVF4,PQ4x3np", table.num_rows)
    assert [s["shard"] for s in index["shards"]] == [0, 1, 2]
    assert sum(s["count"] for s in index["shards"]) == table.num_rows
    recall = index["recall"]
    assert [r["nprobe"] for r in recall["table"]] == [1, 2, 4] and recall["recommended_nprobe"] in (1, 2, 4)
    run_dir = os.path.join(str(tmp_path), "runs", "sharded")
    for shard in index["shards"]:  # ids round trip: each shard's ids Parquet names its embeddings rows
        ids = pq.read_table(os.path.join(run_dir, shard["ids"])).to_pylist()
        rows = pq.read_table(files[shard["shard"]]).column("item_id").to_pylist()
        assert [r["item_id"] for r in ids] == rows
        assert [r["faiss_id"] for r in ids] == [(shard["shard"] << 40) | i for i in range(len(rows))]
    # the sharded loader returns what the merged single index returns
    import faiss

    loaded = open_run(run_dir)
    merged = faiss.read_index(os.path.join(run_dir, index["merged"]))
    faiss.ParameterSpace().set_index_parameter(merged, "nprobe", 4)
    queries = vectors_of(table)[:10]
    scores, ids = loaded.search(queries, 5, nprobe=4)
    want_scores, want_ids = merged.search(queries, 5)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    names = {(s["shard"] << 40) | i: r for s in index["shards"]
             for i, r in enumerate(pq.read_table(os.path.join(run_dir, s["ids"])).column("item_id").to_pylist())}
    assert sorted(map(sorted, ids)) == sorted(sorted(names[i] for i in row) for row in want_ids)


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
    table, dead, manifest, _ = run(pattern, tmp_path, "bad", tiny_text_dir, "--max_failure_fraction", "1")
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
    table, dead, _, _ = run(pattern, tmp_path, "drop", tiny_text_dir, "--media_errors", "drop_media",
                             "--max_failure_fraction", "1")
    rows = {r["item_id"]: r for r in table.drop(["vector"]).to_pylist()}
    assert rows["half-broken"]["num_images"] == 1 and rows["half-broken"]["modalities"] == ["image", "text"]
    assert rows["missing-img"]["modalities"] == ["text"]


def test_missing_catalog_is_a_clear_error(tmp_path, tiny_text_dir, capsys):
    argv = ["run", "--catalog", str(tmp_path / "nothing-here" / "*.parquet"), "--output", str(tmp_path),
            "--clip_model", TINY_CLIP, "--clip_weights", "random", "--text_model", tiny_text_dir]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "nothing-here" in err and "matches no file" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "LATEST")


def test_run_help_lists_options(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["run", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--catalog", "--output", "--clip_model", "--text_model", "--device", "--batch_size", "--preset"):
        assert flag in text


def _wav(samples, rate=16_000) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(samples, np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture()
def audio_catalog(tmp_path):
    """Items with good and bad audio: every bad clip must end as a dead letter with its reason."""
    cat = tmp_path / "catalog"
    (cat / "a").mkdir(parents=True)
    t = np.arange(16_000 * 2) / 16_000
    tone = 0.3 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
    good = _wav(tone)
    (cat / "a" / "tone.wav").write_bytes(good)
    (cat / "a" / "cut.wav").write_bytes(good[: len(good) // 2])
    (cat / "a" / "empty.wav").write_bytes(b"")
    (cat / "a" / "notes.mid").write_bytes(b"MThd\x00\x00\x00\x06 not a container we read")
    (cat / "a" / "long.wav").write_bytes(_wav(np.tile(tone, 4)))  # 8 s, over a 5 s cap
    (cat / "a" / "silence.wav").write_bytes(_wav(np.zeros(16_000)))
    rows = [
        {"item_id": "sound-only", "title": None, "description": None, "image_uris": None, "audio_uri": "a/tone.wav"},
        {"item_id": "sound-and-text", "title": "door chime", "description": None, "image_uris": None,
         "audio_uri": "a/tone.wav"},
        {"item_id": "truncated", "title": "bell", "description": None, "image_uris": None, "audio_uri": "a/cut.wav"},
        {"item_id": "zero-length", "title": "horn", "description": None, "image_uris": None, "audio_uri": "a/empty.wav"},
        {"item_id": "unknown", "title": "synth", "description": None, "image_uris": None, "audio_uri": "a/notes.mid"},
        {"item_id": "too-long", "title": "siren", "description": None, "image_uris": None, "audio_uri": "a/long.wav"},
        {"item_id": "silent", "title": "mute", "description": None, "image_uris": None, "audio_uri": "a/silence.wav"},
        {"item_id": "missing", "title": "gong", "description": None, "image_uris": None, "audio_uri": "a/nope.wav"},
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA), cat / "part.parquet")
    return str(cat / "part.parquet"), len(rows)


def test_bad_audio_becomes_dead_letters_and_clap_embeds_sounds(audio_catalog, tiny_text_dir, tiny_whisper_dir,
                                                              tiny_clap_dir, tmp_path):
    catalog, n_rows = audio_catalog
    table, dead, manifest, files = run(
        catalog, tmp_path, "audio", tiny_text_dir, "--asr_backend", "transformers", "--asr_model", tiny_whisper_dir,
        "--asr_weights", "random", "--clap_model", tiny_clap_dir, "--clap_weights", "random",
        "--max_audio_seconds", "5", "--max_failure_fraction", "1")
    fates = {r["item_id"]: r["reason"] for r in dead.to_pylist()}
    assert fates == {"truncated": "decode_failed", "zero-length": "decode_failed", "unknown": "unsupported_format",
                     "too-long": "audio_too_long", "silent": "silent_audio", "missing": "missing_media"}
    assert all(r["stage"] in ("decode", "fetch") and r["source"].startswith(os.path.dirname(catalog))
               for r in dead.to_pylist())
    rows = {r["item_id"]: r for r in table.drop(["vector"]).to_pylist()}
    assert set(rows) == {"sound-only", "sound-and-text"}
    assert rows["sound-only"]["modalities"] == ["audio"] and rows["sound-only"]["transcript"] is not None
    meta = read_metadata(files[0])
    assert [b["space"] for b in meta["layout"]] == ["clip", "text", "clap"]
    assert meta["models"]["clap"]["weights_label"] == "random" and meta["dim"] == 16 + 32 + 16
    clap = slice(48, 64)
    vectors = vectors_of(table)
    ids = table.column("item_id").to_pylist()
    assert np.linalg.norm(vectors[ids.index("sound-only"), clap]) > 0  # the CLAP block is filled
    assert manifest["counts"]["embedded"] + sum(manifest["counts"]["dead_letters"].values()) == n_rows


def test_drop_media_keeps_items_whose_audio_failed(audio_catalog, tiny_text_dir, tiny_whisper_dir, tmp_path):
    catalog, n_rows = audio_catalog
    table, dead, _, _ = run(catalog, tmp_path, "audio-drop", tiny_text_dir, "--asr_backend", "transformers",
                            "--asr_model", tiny_whisper_dir, "--asr_weights", "random",
                            "--media_errors", "drop_media", "--max_audio_seconds", "5")
    rows = {r["item_id"]: r for r in table.drop(["vector"]).to_pylist()}
    assert len(rows) == n_rows and dead.num_rows == 0
    for item in ("truncated", "zero-length", "unknown", "too-long", "silent", "missing"):
        assert rows[item]["modalities"] == ["text"] and rows[item]["transcript"] is None


def test_without_audio_models_an_audio_only_item_is_a_counted_skip(audio_catalog, tiny_text_dir, tmp_path):
    catalog, n_rows = audio_catalog
    table, dead, manifest, _ = run(catalog, tmp_path, "no-asr", tiny_text_dir, "--asr_model", "none")
    # no ASR and no CLAP: audio is never fetched; the sound-only item has nothing this run embeds,
    # which is the run's configuration, not bad data: a counted skip, not a failure
    assert dead.num_rows == 0
    counts = manifest["counts"]
    assert counts["skipped_by_reason"] == {"no_configured_modality": 1} and counts["skipped"] == 1
    assert table.num_rows == 7 == counts["embedded"] == n_rows - 1
