"""The index stage's training sample, gathered in two phases: positions (ids only) through Beam, then the rows.

The sample must be exactly the rows whose id hashes are smallest, as a
single pass over every file would pick them, and each file must be read for
its ids once and for its vectors only where they are used (sample, fill).
"""
from __future__ import annotations

import json
import os
from collections import Counter

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import IndexConfig
from pipeline.index import indexing
from pipeline.stages import index as stage
from test_index_stage import DIM, SHARDS, _write_shards


def _brute_force_sample(files: list[str], size: int) -> tuple[list[str], np.ndarray]:
    """Every file read whole, every row's key, the ``size`` smallest over all of them."""
    ids, vecs = [], []
    for path in files:
        i, v = stage.read_shard(path)
        ids += i
        vecs.append(v)
    order = np.argsort(stage.sample_keys(ids), kind="stable")[:size]
    return [ids[r] for r in order], np.concatenate(vecs)[order]


def _files(tmp_path, n: int = 3000, seed: int = 4) -> list[str]:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    directory = str(tmp_path / "embeddings")
    _write_shards(x, directory)
    return sorted(os.path.join(directory, f) for f in os.listdir(directory))


def _build(tmp_path, files: list[str], config: IndexConfig, *runner: str) -> dict:
    """BuildIndex over ``files`` in a pipeline of its own; the index dict it emits."""
    from apache_beam.options.pipeline_options import PipelineOptions

    out = str(tmp_path / "info.json")
    with beam.Pipeline(options=PipelineOptions(list(runner))) as p:
        (p | beam.Create(files) | stage.BuildIndex(config, str(tmp_path), DIM)
         | beam.Map(lambda info: open(out, "w").write(json.dumps(info))))
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("size", [5, 700, 2500, 10_000])  # within a file, over files, over all rows
def test_two_phase_sample_is_the_rows_with_the_smallest_keys(tmp_path, size):
    files = _files(tmp_path)
    out = str(tmp_path / "sample.json")
    with beam.Pipeline() as p:
        (p | beam.Create(files) | beam.ParDo(stage._SampleFile(size)) | beam.CombineGlobally(stage.SmallestKeys(size))
         | beam.Map(lambda s: open(out, "w").write(json.dumps(
             {"keys": s.keys.tolist(), "file_of": s.file_of.tolist(), "rows": s.rows.tolist(),
              "paths": list(s.paths), "seen": s.seen}))))
    with open(out) as f:
        raw = json.load(f)
    keys = stage.KeySample(np.array(raw["keys"], np.int64), np.array(raw["file_of"], np.int32),
                           np.array(raw["rows"], np.int64), tuple(raw["paths"]), raw["seen"])
    assert keys.seen == 3000 and keys.files == SHARDS
    assert np.all(np.diff(keys.keys) >= 0)
    sample = stage.read_sample(keys, DIM)
    want_ids, want_vectors = _brute_force_sample(files, size)
    assert list(sample.item_ids) == want_ids
    np.testing.assert_array_equal(sample.vectors, want_vectors)
    assert sample.seen == 3000 and sample.files == SHARDS


def test_a_file_rewritten_between_the_phases_is_an_error(tmp_path):
    files = _files(tmp_path)
    keys = stage.KeySample.merge([stage.KeySample.of_file(f, stage.read_ids(f), 100) for f in files], 100)
    table = pq.read_table(files[0])
    pq.write_table(table.slice(1), files[0])  # every row moves up by one
    with pytest.raises(ValueError, match="changed while the index sample was read"):
        stage.read_sample(keys, DIM)


@pytest.mark.parametrize("shard_vectors, vector_reads", [(1_000_000, 1), (300, 2)])
def test_build_reads_ids_once_and_vectors_once_or_twice(tmp_path, monkeypatch, shard_vectors, vector_reads):
    """One index shard: the train step fills it from the files its sample read took whole (each file's vectors
    read once); several: each fill worker reads its own files again."""
    files = _files(tmp_path, n=1200)
    reads: Counter = Counter()
    real = pq.read_table

    def counting(source, columns=None, **kw):
        reads[(getattr(source, "name", str(source)).rsplit("/", 1)[-1], tuple(columns or ()))] += 1
        return real(source, columns=columns, **kw)

    monkeypatch.setattr(pq, "read_table", counting)  # storage.read_table calls it by module
    config = IndexConfig(factory="IVF8,Flat", train_size=600, num_queries=50, memory_gb=1.0,
                         shard_vectors=shard_vectors)
    info = _build(tmp_path, files, config)
    assert info["ntotal"] == 1200 and len(info["shards"]) == (1 if vector_reads == 1 else SHARDS)
    assert sum(s["count"] for s in info["shards"]) == 1200
    for path in files:
        name = os.path.basename(path)
        assert reads[(name, ("item_id",))] == 1
        assert reads[(name, ("item_id", "vector"))] == vector_reads  # the sample's rows (and the index shard's)
    assert sum(reads.values()) == (1 + vector_reads) * SHARDS


def test_one_shard_starts_from_the_selections_measured_index_and_equals_a_fresh_fill(tmp_path):
    """The single index shard is the selection's winner (holding the training rows under their shard ids) plus
    every other row: the same ids, lists and codes as the trained index filled from scratch."""
    files = _files(tmp_path, n=3000)
    config = IndexConfig(train_size=1200, num_queries=100, memory_gb=1.0, target_recall=0.9)
    info = _build(tmp_path, files, config)
    assert info["candidates"] and len(info["shards"]) == 1 and info["ntotal"] == 3000
    assert info["rows_from_selection"] == info["training"]["vectors"] == 1200  # the held-out 100 added after
    shard = indexing.from_bytes(open(tmp_path / info["shards"][0]["index"], "rb").read())
    trained = open(tmp_path / info["trained"], "rb").read()
    vectors = np.concatenate([stage.read_shard(f)[1] for f in files])
    fresh, ids = indexing.fill_shard(trained, vectors, 0)
    queries = vectors[:50] + 0.01
    for index in (shard, fresh):
        indexing.apply_search_params(index, {"nprobe": 1 << 20} if indexing.is_ivf(index) else {})
    got, want = shard.search(queries, 10), fresh.search(queries, 10)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)  # same codes, every list scanned
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got[1], want[1])]) > 0.99
    ivf = indexing.faiss.try_extract_index_ivf(shard)
    if ivf is not None:  # every row once, under its shard id
        lists = ivf.invlists
        held = np.concatenate([indexing.faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                               for i in range(ivf.nlist)])
        np.testing.assert_array_equal(np.sort(held), ids)


def test_the_bundle_based_runner_sees_one_trained_index(tmp_path):
    """The shard the train step fills travels inside its one output: with a second (tagged) output, the
    bundle-based DirectRunner put both into the trained index's singleton side input."""
    files = _files(tmp_path, n=400)
    config = IndexConfig(train_size=300, num_queries=20, memory_gb=1.0)
    info = _build(tmp_path, files, config, "--runner=BundleBasedDirectRunner")
    assert info["ntotal"] == 400 and len(info["shards"]) == 1
