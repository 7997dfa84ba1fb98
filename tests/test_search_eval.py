"""search, eval and fit-fusion on pipeline runs of the sample catalog with tiny random models."""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_sample_text_image, tiny_run_argv
from pipeline import cli
from pipeline.query.encoder import QueryEncoder, QueryError, load_run
from pipeline.query.search import ExactSearcher
from schemas.catalog import validate_row

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "sample_catalog")
QUERIES = os.path.join(SAMPLE, "queries.jsonl")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_text_dir):
    out = tmp_path_factory.mktemp("out")
    dirs = {mode: run_sample_text_image(out, mode, tiny_text_dir, "--fusion_mode", mode) for mode in ("concat", "attention")}
    return out, dirs


def _item_text(item_id):
    rows = pq.read_table(os.path.join(SAMPLE, "catalog.parquet")).to_pylist()
    return validate_row(next(r for r in rows if r["item_id"] == item_id)).text


def _stored(run, item_id):
    searcher = ExactSearcher.from_files(run.embedding_files)
    return searcher.vectors[searcher.ids.index(item_id)]


def test_every_item_is_a_unit_vector_in_every_mode(runs):
    _, dirs = runs
    for mode, run_dir in dirs.items():
        run = load_run(run_dir)
        assert run.metadata["fusion"]["mode"] == mode
        vectors = ExactSearcher.from_files(run.embedding_files).vectors
        rows = pq.read_table(os.path.join(SAMPLE, "catalog.parquet")).to_pylist()
        assert len(vectors) == sum(1 for r in rows if r["title"] or r["description"] or r["image_uris"])
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    concat = load_run(dirs["concat"])
    assert [(b["space"], b.get("modality")) for b in concat.metadata["layout"]] == [
        ("clip", "text"), ("clip", "image"), ("text", "text")]
    assert concat.metadata["dim"] == 16 + 16 + 32


def test_queries_use_the_items_layout(runs):
    _, dirs = runs
    run = load_run(dirs["attention"])
    encoder = QueryEncoder(run)
    # a text-only item's own text and an image-only item's own photo encode to the stored item vectors
    q = encoder.encode("text", [_item_text("sku-0025")])[0]
    np.testing.assert_allclose(q, _stored(run, "sku-0025"), atol=1e-5)
    img = encoder.encode("image", [os.path.join(SAMPLE, "images", "logo.jpg")])[0]
    np.testing.assert_allclose(img, _stored(run, "sku-0032"), atol=1e-5)
    scores, ids = ExactSearcher.from_files(run.embedding_files).search(np.stack([q, img]), 3)
    assert ids[0][0] == "sku-0025" and ids[1][0] == "sku-0032"
    assert scores[0][0] == pytest.approx(1, abs=1e-5)

    # concat: a text query fills the clip text *and* image blocks; a text-only item covers 2 of 3
    # equally weighted blocks, so its own text scores sqrt(2/3) (see encoders/fusion.py)
    concat = load_run(dirs["concat"])
    q = QueryEncoder(concat).encode("text", [_item_text("sku-0025")])[0]
    assert float(q @ _stored(concat, "sku-0025")) == pytest.approx(math.sqrt(2 / 3), abs=1e-5)


def test_search_command(runs, capsys):
    out, dirs = runs
    assert cli.main(["search", "--run", dirs["attention"], "--text", _item_text("sku-0026"), "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "attention fusion" in lines[0] and len(lines) == 4
    assert lines[1].split()[1] == "sku-0026" and "score=1.0000" in lines[1]
    # OUT follows LATEST (the last run, attention); l2 prints distances
    assert cli.main(["search", "--run", str(out), "--image", os.path.join(SAMPLE, "images", "logo.jpg"),
                     "--metric", "l2", "-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split()[1] == "sku-0032" and "dist=0.0000" in lines[1]
    assert cli.main(["search", "--run", dirs["concat"], "--audio", "clip.wav"]) == 2
    assert "audio queries need the audio encoders" in capsys.readouterr().err
    assert cli.main(["search", "--run", str(out / "nothing"), "--text", "x"]) == 2


@pytest.mark.parametrize("verb", ["search", "eval", "fit-fusion"])
def test_verbs_have_help(verb, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([verb, "--help"])
    assert done.value.code == 0
    assert "--run" in capsys.readouterr().out


def test_eval_command_writes_metrics(runs, tmp_path, capsys):
    _, dirs = runs
    out = tmp_path / "report.json"
    assert cli.main(["eval", "--run", dirs["concat"], "--queries", QUERIES, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "recall@10" in printed
    report = json.loads(out.read_text())
    assert report["overall"]["queries"] == 26
    assert report["by_modality"]["text"]["queries"] == 22 and report["by_modality"]["image"]["queries"] == 4
    per = report["per_query"]
    for key in ("recall@1", "recall@5", "recall@10", "mrr", "ndcg@10"):
        assert report["overall"][key] == pytest.approx(np.mean([q[key] for q in per]))
        assert 0 <= report["overall"][key] <= 1
    # the default report path is inside the run
    assert cli.main(["eval", "--run", dirs["concat"], "--queries", QUERIES]) == 0
    assert os.path.exists(os.path.join(dirs["concat"], "eval", "queries.json"))


def test_eval_counts_queries_it_cannot_encode(runs, tmp_path):
    from pipeline.query.evaluate import QueriesFileError, evaluate, read_queries

    _, dirs = runs
    run = load_run(dirs["attention"])
    path = tmp_path / "q.jsonl"
    path.write_text('{"modality": "text", "query": "mug", "relevant": ["sku-0001"]}\n'
                    '{"modality": "audio", "query": "a.wav", "relevant": ["sku-0001"]}\n')
    report = evaluate(run, read_queries(str(path)), ExactSearcher.from_files(run.embedding_files), QueryEncoder(run))
    assert report["overall"]["queries"] == 1 and report["skipped"]["audio"]["queries"] == 1
    path.write_text('{"modality": "video", "query": "x", "relevant": ["a"]}\n')
    with pytest.raises(QueriesFileError, match="q.jsonl:1: modality 'video'"):
        read_queries(str(path))
    with pytest.raises(QueryError, match="no encoder for audio|audio encoders"):
        QueryEncoder(run).encode("audio", ["a.wav"])


@pytest.mark.slow
def test_fit_fusion_module_is_used_by_the_pipeline(runs, tiny_text_dir, tmp_path, capsys):
    out, dirs = runs
    module = tmp_path / "attention.safetensors"
    assert cli.main(["fit-fusion", "--run", dirs["concat"], "--queries", QUERIES, "--epochs", "30",
                     "--out", str(module)]) == 0
    printed = capsys.readouterr().out
    assert "attention_learned" in printed and "mean" in printed
    report = json.loads((tmp_path / "attention.safetensors.report.json").read_text())
    assert report["training"]["loss_last"] < report["training"]["loss_first"]
    assert report["pairs"]["train"] > 0 and report["pairs"]["held_out"] > 0

    run_dir = run_sample_text_image(out, "learned", tiny_text_dir, "--fusion_mode", "attention", "--fusion_module", str(module))
    run = load_run(run_dir)
    fusion = run.metadata["fusion"]["attention"]
    assert fusion["rule"] == "learned" and len(fusion["sha256"]) == 64
    vectors = ExactSearcher.from_files(run.embedding_files).vectors
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert cli.main(["eval", "--run", run_dir, "--queries", QUERIES]) == 0
    # a changed module file is refused, not silently used for queries
    module.write_bytes(module.read_bytes() + b" ")
    assert cli.main(["search", "--run", run_dir, "--text", "mug"]) == 2
    assert "has changed since it was recorded" in capsys.readouterr().err
    with pytest.raises(QueryError, match="changed"):
        QueryEncoder(load_run(run_dir))


def test_fit_fusion_reads_the_catalog_with_the_runs_column_mapping(tmp_path, tiny_text_dir):
    """A run made with --item_id_column etc. is read by fit-fusion as the pipeline read it."""
    from pipeline.query.fit_fusion import read_catalog, run_catalog

    rows = pq.read_table(os.path.join(SAMPLE, "catalog.parquet")).to_pylist()[:8]
    renamed = [{"sku": r["item_id"], "name": r["title"], "blurb": r["description"],
                "pics": r["image_uris"]} for r in rows]
    for uri in {u for r in rows for u in r["image_uris"] or []}:  # URIs stay relative to the catalog's folder
        os.makedirs(tmp_path / os.path.dirname(uri), exist_ok=True)
        shutil.copy(os.path.join(SAMPLE, uri), tmp_path / uri)
    catalog = tmp_path / "renamed.parquet"
    pq.write_table(pa.Table.from_pylist(renamed), catalog)
    run_dir = os.path.join(tmp_path, "out", "runs", "cols")
    argv = tiny_run_argv(catalog, tmp_path / "out", "cols", tiny_text_dir, "--asr_model", "none",
                         "--item_id_column", "sku", "--title_column", "name", "--description_column", "blurb",
                         "--image_column", "pics")
    assert cli.main(argv) == 0
    run = load_run(run_dir)
    items, counts = run_catalog(run)
    assert [i.item_id for i in items] == [r["item_id"] for r in rows]
    assert counts == {"invalid_row": 0, "duplicate_id": 0}
    assert items[0].title == rows[0]["title"] and len(items[0].image_uris) == len(rows[0]["image_uris"])
    # the default column names (what fit-fusion used before) find no item id in this catalog
    assert read_catalog(str(catalog))[1]["invalid_row"] == len(rows)
