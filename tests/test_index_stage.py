"""The Beam index stage with automatic parameters: candidates measured, the winner built, its setting served.

Seeded clustered vectors written as embeddings shards (DirectRunner), a
budget large enough for every family and a tight one, and recall queries
from other cluster centres (the harder, cross-distribution case).
"""
from __future__ import annotations

import json
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.index import index_select, indexing
from pipeline.config import IndexConfig
from pipeline.stages.index import BuildIndex
from pipeline.query.recall_queries import RecallQueries
from pipeline.index.runs import open_run
from schemas.embeddings import embeddings_schema
from test_indexing import clustered

DIM, SHARDS = 32, 3
CANDIDATE_KEYS = {"name", "family", "bytes_per_vector", "memory_bytes", "fits_budget", "skipped_reason",
                  "train_seconds", "settings", "best_setting", "meets_target"}
SETTING_KEYS = {"params", "query_set", "recall_at_10", "recall_at_1", "ms_per_query_batch", "ms_single_p50"}


def _write_shards(vectors: np.ndarray, directory: str) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    schema = embeddings_schema(DIM, "float32", {"test": True})
    paths = []
    for shard, rows in enumerate(np.array_split(np.arange(len(vectors)), SHARDS)):
        n = len(rows)
        table = pa.Table.from_pydict({
            "item_id": pa.array([f"item-{i:06d}" for i in rows]),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors[rows].reshape(-1)), DIM),
            "modalities": pa.array([["text"]] * n, pa.list_(pa.string())), "content_hash": pa.array([""] * n),
            "model_fingerprint": pa.array([""] * n), "num_images": pa.array([0] * n, pa.int32()),
            "attributes": pa.array([None] * n, pa.string()), "transcript": pa.array([None] * n, pa.string()),
            "title": pa.array([None] * n, pa.string()), "snippet": pa.array([None] * n, pa.string()),
        }, schema=schema)
        paths.append(f"{directory}/part-{shard:05d}-of-{SHARDS:05d}.parquet")
        pq.write_table(table, paths[-1])
    return paths


def _build(run_dir: str, config: IndexConfig, recall: RecallQueries | None) -> dict:
    files = sorted(os.path.join(run_dir, "embeddings", f) for f in os.listdir(os.path.join(run_dir, "embeddings")))
    out = os.path.join(run_dir, "info.json")
    with beam.Pipeline() as p:
        (p | beam.Create(files) | BuildIndex(config, run_dir, DIM, recall_queries=recall)
         | beam.Map(lambda info: open(out, "w").write(json.dumps(info))))
    with open(out) as f:
        info = json.load(f)
    with open(os.path.join(run_dir, "manifest.json"), "w") as f:  # what Publish writes, for open_run
        json.dump({"run_id": os.path.basename(run_dir), "index": info, "files": []}, f)
    return info


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    x = clustered(6000, DIM, clusters=40, noise=0.35, seed=1)
    far = clustered(150, DIM, clusters=40, noise=0.35, seed=9)
    recall = RecallQueries(far, {"file": "q.jsonl", "queries": 150, "encoded": 150, "by_modality": {"text": 150},
                                 "failed": []})
    out = {}
    tight = 20 * 6000 / (1 << 30)
    # roomy and tight3: 2,000 vectors per index shard, one per embeddings file; tight: the default, one index shard
    for name, gb, shard_vectors in (("roomy", 1.0, 2000), ("tight3", tight, 2000), ("tight", tight, 1_000_000)):
        run_dir = str(tmp_path_factory.mktemp(name))
        _write_shards(x, os.path.join(run_dir, "embeddings"))
        config = IndexConfig(train_size=4000, num_queries=300, memory_gb=gb, target_recall=0.95, merge=True,
                             shard_vectors=shard_vectors)
        trained = []  # every candidate training (name), and any training outside the selection
        real_train_candidate, real_train_index = index_select.train_candidate, indexing.train_index
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(index_select, "train_candidate",
                       lambda cand, *a, _log=trained, _train=real_train_candidate, **kw:
                       _log.append(cand.name) or _train(cand, *a, **kw))
            mp.setattr(indexing, "train_index",
                       lambda params, *a, _log=trained, _train=real_train_index, **kw:
                       _log.append("train_index") or _train(params, *a, **kw))
            info = _build(run_dir, config, recall)
        out[name] = (run_dir, info, x, far, trained)
    return out


def test_manifest_records_every_candidate_and_why_the_winner_won(built):
    _, info, _, _, _ = built["roomy"]
    assert info["candidates"] and all(CANDIDATE_KEYS <= set(c) for c in info["candidates"])
    assert all(SETTING_KEYS <= set(s) for c in info["candidates"] for s in c["settings"])
    chosen = info["chosen"]
    assert chosen["name"] == info["factory"] and chosen["family"] == info["family"] and chosen["why"]
    winner = next(c for c in info["candidates"] if c["name"] == chosen["name"])
    assert winner["meets_target"] and winner["fits_budget"]
    # both query sets measured, in the selection and in the self-check on the full index
    assert {s["query_set"] for s in winner["settings"]} == {"held_out", "recall_queries"}
    recall = info["recall"]
    assert recall["recall_queries"] == 150 and recall["recall_queries_table"] and recall["table"]
    assert recall["recall_queries_file"]["encoded"] == 150
    assert info["search_params"] == recall["recommended_params"] == chosen["params"]
    assert recall["target_reached"]
    best = [r for r in recall["table"] + recall["recall_queries_table"] if r["params"] == info["search_params"]]
    assert len(best) == 2 and all(r["recall_10_at_10"] >= 0.95 for r in best)
    assert info["self_check_seconds"] >= 0 and info["training"]["selection_seconds"] > 0
    assert info["ground_truth_seconds"] > 0  # the per-shard exact top-k, timed apart from the adds


@pytest.mark.parametrize("name, index_shards", [("tight3", SHARDS), ("tight", 1)])
def test_tight_budget_is_kept(built, name, index_shards):
    run_dir, info, x, _, _ = built[name]
    assert info["estimated_bytes"] <= 20 * len(x) and info["family"] in ("ivf_pq", "ivf_pq_opq")
    # on disk too: every shard file carries its own coarse quantizer and codebooks, and the preflight counts them
    written = sum(os.path.getsize(os.path.join(run_dir, s["index"])) for s in info["shards"])
    assert len(info["shards"]) == index_shards and written <= 20 * len(x)
    assert abs(info["estimated_bytes"] - written) <= 0.1 * written, (info["estimated_bytes"], written)
    assert any(not c["fits_budget"] and "over the memory budget" in c["skipped_reason"] for c in info["candidates"])
    assert sorted(f for s in info["shards"] for f in s["embeddings"]) == sorted(
        f"embeddings/part-{i:05d}-of-{SHARDS:05d}.parquet" for i in range(SHARDS))


def test_one_index_shard_holds_the_fixed_part_once_and_spends_it_on_codes(built):
    """Under the same tight budget, one index shard (every file grouped) leaves more bytes to the PQ codes than
    one shard per file, and the search through open_run still maps every faiss id to its item."""
    _, three, _, _, _ = built["tight3"]
    run_dir, one, x, far, _ = built["tight"]
    assert one["m"] > three["m"], (one["factory"], three["factory"])
    assert one["shards"][0]["count"] == len(x) and one["shard_vectors"] == 1_000_000
    run = open_run(run_dir)
    _, found = run.search(x[:50], 10)
    # the files' rows in file order: faiss id 0 << 40 | row is item row, whatever the codes found
    _, ids = run.index.search(x[:50], 10)
    shard, row = indexing.split_ids(ids)
    assert set(shard.ravel()) == {0} and found == [[f"item-{r:06d}" for r in rows] for rows in row]


@pytest.mark.parametrize("name", ["roomy", "tight3", "tight"])
def test_the_build_trains_each_measured_candidate_once_and_never_the_winner_again(built, name):
    _, info, _, _, trained = built[name]
    measured = [c["name"] for c in info["candidates"] if c["settings"]]
    assert sorted(trained) == sorted(measured) and info["factory"] in trained and "train_index" not in trained


def test_open_run_applies_the_recorded_setting(built):
    run_dir, info, x, far, _ = built["roomy"]
    run = open_run(run_dir)
    assert run.default_params == info["search_params"]
    truth = indexing.exact_topk(x, np.arange(len(x)), far, 10, "ip")[1]
    names = [[f"item-{i:06d}" for i in row] for row in truth]
    _, found = run.search(far, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, names)])
    assert recall >= 0.9
    if run.index.ivf:  # an explicit nprobe still overrides the recorded one
        assert run.search_params(nprobe=1)["nprobe"] == 1


def test_a_comparable_night_reuses_the_chosen_index_and_skips_the_selection(built, tmp_path):
    from pipeline.stages.incremental import PreviousRun
    from pipeline.index.quantizer_reuse import REUSABLE_FAMILIES

    run_dir, first, x, _, _ = built["roomy"]
    assert first["family"] in REUSABLE_FAMILIES  # the test data is large enough for an IVF winner
    second_dir = str(tmp_path / "night2")
    os.symlink(os.path.join(run_dir, "embeddings"), os.path.join(second_dir, "embeddings")) \
        if os.makedirs(second_dir) is None else None
    config = IndexConfig(train_size=4000, num_queries=300, memory_gb=1.0, target_recall=0.95)
    files = sorted(os.path.join(second_dir, "embeddings", f) for f in os.listdir(os.path.join(second_dir, "embeddings")))
    out = os.path.join(second_dir, "info.json")
    with beam.Pipeline() as p:
        (p | beam.Create(files)
         | BuildIndex(config, second_dir, DIM, previous=PreviousRun(run_dir, os.path.basename(run_dir), True))
         | beam.Map(lambda info: open(out, "w").write(json.dumps(info))))
    with open(out) as f:
        second = json.load(f)
    assert second["quantizer"]["reused"] and second["factory"] == first["factory"]
    assert second["candidates"] == [] and "candidate selection skipped" in second["chosen"]["why"]
    assert second["training"]["vectors"] == 0 and second["recall"]["target_reached"]


def test_recall_queries_are_encoded_with_the_runs_models_and_measured(tmp_path, tiny_text_dir):
    """The sample catalog's eval queries (typed text and photos against its items) as --recall_queries."""
    import json as _json

    from conftest import SAMPLE, run_sample_text_image
    from pipeline import cli

    queries = str(SAMPLE / "queries.jsonl")
    lines = [line for line in open(queries) if line.strip()]
    run_dir = run_sample_text_image(tmp_path, "rq", tiny_text_dir, "--recall_queries", queries)
    with open(os.path.join(run_dir, "manifest.json")) as f:
        recall = _json.load(f)["index"]["recall"]
    info = recall["recall_queries_file"]
    assert info["queries"] == len(lines) and info["encoded"] + len(info["failed"]) == len(lines)
    assert recall["recall_queries"] == info["encoded"] > 0 and recall["recall_queries_table"]
    assert all(r["query_set"] == "recall_queries" for r in recall["recall_queries_table"])
    # a file that is not eval's format: one clear line before any work, no traceback
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"modality": "smell", "query": "x", "relevant": ["a"]}\n')
    assert cli.main(["run", "--catalog", str(SAMPLE / "catalog.parquet"), "--output", str(tmp_path / "o2"),
                     "--clip_model", os.path.join(os.path.dirname(__file__), "data", "tiny-clip.json"),
                     "--clip_weights", "random", "--text_model", tiny_text_dir, "--device", "cpu",
                     "--asr_model", "none", "--recall_queries", str(bad)]) == 2
