"""Index logic on seeded clustered vectors: parameters, sharding, ids, recall, merging (no Beam)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.index import indexing
from pipeline.config import IndexConfig


def clustered(n: int, dim: int, clusters: int = 50, noise: float = 0.3, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres: the structure IVF exploits, as real embeddings have."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    x = clustered(3200, 32)
    return x[:3000], x[3000:]  # database, held-out queries


_TRAINED = {}


def trained_bytes(xb, metric):
    """One small IVF-PQ per metric for the module (training dominates these tests' time)."""
    if metric not in _TRAINED:
        params = indexing.choose_params(len(xb), 32, len(xb), metric=metric, m=16, nbits=6)
        assert params.kind == "ivfpq" and params.nlist > 1
        _TRAINED[metric] = indexing.to_bytes(indexing.train_index(params, xb))
    return _TRAINED[metric]


def test_params_follow_n_and_memory_budget():
    big = indexing.choose_params(10**6, 512, 100_000)
    assert (big.kind, big.nlist, big.m, big.nbits) == ("ivfpq", 2048, 64, 8)
    assert big.factory == "IVF2048,PQ64x8np" and big.estimated_bytes < 4 << 30
    tight = indexing.choose_params(10**6, 512, 100_000, memory_gb=0.03)
    assert tight.m < big.m and tight.estimated_bytes <= 0.03 * (1 << 30)
    assert indexing.choose_params(10**6, 512, 100_000, opq=True, metric="l2").factory.startswith("OPQ64,IVF2048")
    small = indexing.choose_params(1000, 48, 1000)
    assert small.kind == "ivfpq" and small.nlist * indexing.MIN_POINTS_PER_CENTROID <= 1000 and 48 % small.m == 0
    assert indexing.choose_params(100, 48, 100, factory="IVF8,PQ8").nlist == 8


def test_too_few_vectors_fall_back_to_flat_with_a_message():
    p = indexing.choose_params(35, 48, 35)
    assert p.kind == "flat" and p.factory == indexing.FLAT_FACTORY and "too few" in p.note
    p = indexing.choose_params(35, 48, 35, nlist=64)
    assert p.kind == "flat" and "IVF64" in p.note
    x = clustered(35, 48)
    index, ids = indexing.fill_shard(indexing.train_index(p, x), x, 0)
    truth = indexing.exact_topk(x, ids, x, 5, "ip")
    assert np.array_equal(indexing.ShardedIndex([index], "ip").search(x, 5)[1], truth[1])


@pytest.mark.parametrize("kwargs, message", [
    ({"m": 5}, "must divide the dimension 32"), ({"metric": "cosine"}, "not one of"), ({"nbits": 20}, "nbits")])
def test_bad_params_are_named(kwargs, message):
    with pytest.raises(indexing.IndexParamsError, match=message):
        indexing.choose_params(5000, 32, 5000, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"factory": "IVF8,Flat", "nlist": 4}, "excludes"), ({"metric": "cos"}, "not one of"),
    ({"target_recall": 1.5}, "target recall"), ({"memory_gb": 0}, "memory budget")])
def test_index_config_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IndexConfig(**kwargs)


def test_ids_are_collision_free_and_round_trip():
    ids = np.concatenate([indexing.make_ids(s, 1000) for s in (0, 1, 7, indexing.MAX_SHARD)])
    assert len(np.unique(ids)) == len(ids) and ids.min() >= 0
    shard, row = indexing.split_ids(np.append(ids, -1))
    assert list(shard[[0, 1000, 2000, 3000, -1]]) == [0, 1, 7, indexing.MAX_SHARD, -1]
    assert list(row[[0, 999, 1999, -1]]) == [0, 999, 999, -1]
    table = indexing.ids_table(ids[:3], ["a", "b", "c"])
    assert table.schema == indexing.IDS_SCHEMA and table.column("faiss_id").to_pylist() == list(ids[:3])
    with pytest.raises(ValueError, match="outside"):
        indexing.make_ids(indexing.MAX_SHARD + 1, 1)


@pytest.mark.parametrize("n, files, shard_vectors, expected", [
    (200_000, 4, 1_000_000, 1), (2_500_000, 4, 1_000_000, 3), (5_000_000, 2, 1_000_000, 2), (0, 0, 10, 1)])
def test_index_shard_count_groups_files_by_vectors_per_shard(n, files, shard_vectors, expected):
    count = indexing.index_shard_count(n, files, shard_vectors)
    assert count == expected
    groups = [indexing.index_shard_of(f, files, count) for f in range(files)]
    # contiguous runs of files, every index shard used, none out of range
    assert groups == sorted(groups) and set(groups) == (set(range(count)) if files else set())


def test_index_config_shard_vectors_must_be_positive():
    with pytest.raises(ValueError, match="shard vectors"):
        IndexConfig(shard_vectors=0)


def _sharded(x, metric, num_shards):
    trained = trained_bytes(x, metric)
    parts = np.array_split(np.arange(len(x)), num_shards)
    filled = [indexing.fill_shard(trained, x[rows], s) for s, rows in enumerate(parts)]
    return trained, [f[0] for f in filled], np.concatenate([f[1] for f in filled])


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_sharded_search_equals_single_index_search(data, metric):
    xb, xq = data
    trained, shards, ids = _sharded(xb, metric, 4)
    single = indexing.from_bytes(trained)
    single.add_with_ids(xb, ids)  # the same vectors under the same ids, in one index
    faiss_params = __import__("faiss").ParameterSpace()
    faiss_params.set_index_parameter(single, "nprobe", 8)
    want_s, want_i = single.search(xq, 10)
    got_s, got_i = indexing.ShardedIndex(shards, metric).search(xq, 10, nprobe=8)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)
    # same scores; ids agree wherever a score is not tied with a neighbour's
    tied = np.zeros_like(got_s, dtype=bool)
    tied[:, 1:] |= np.isclose(got_s[:, 1:], got_s[:, :-1])
    tied[:, :-1] |= np.isclose(got_s[:, :-1], got_s[:, 1:])
    assert np.array_equal(got_i[~tied], want_i[~tied]) and (~tied).mean() > 0.9
    merged = indexing.merge_shards(trained, shards)
    faiss_params.set_index_parameter(merged, "nprobe", 8)
    assert merged.ntotal == len(xb)
    np.testing.assert_allclose(merged.search(xq, 10)[0], want_s, rtol=1e-5, atol=1e-5)


def test_recall_on_clustered_data_and_recommended_nprobe(data):
    xb, xq = data
    _, shards, ids = _sharded(xb, "ip", 3)
    nlist = indexing.nlist_of(shards[0])
    parts = np.array_split(np.arange(len(xb)), 3)
    truth = indexing.merge_topk([indexing.exact_topk(xb[r], ids[r], xq, 10, "ip") for r in parts], 10, "ip")[1]
    assert np.array_equal(truth, indexing.exact_topk(xb, ids, xq, 10, "ip")[1])  # per-shard truth merges exactly
    table = indexing.recall_table(indexing.ShardedIndex(shards, "ip"), xq, truth, 10, (1, 4, 16, 64, 1024))
    assert [r["nprobe"] for r in table] == sorted({1, 4, 16, 64, nlist})
    recalls = [r["recall_10_at_10"] for r in table]
    assert all(b >= a - 0.01 for a, b in zip(recalls, recalls[1:]))  # probing more lists finds no less
    assert recalls[0] < recalls[-1]
    # PQ-limited (12 bytes per 32-d vector) but far above chance (10 of 3000)
    assert recalls[-1] > 0.6 and table[-1]["recall_1_at_1"] > 0.3
    nprobe, reached = indexing.recommend_nprobe(table, 0.45)
    assert reached and nprobe == next(r["nprobe"] for r in table if r["recall_10_at_10"] >= 0.45)
    best = max(recalls)
    assert indexing.recommend_nprobe(table, 1.0) == (
        min(r["nprobe"] for r in table if r["recall_10_at_10"] == best), False)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("nq", [3, 700])  # below and above faiss's own BLAS threshold (nq x dim vs 128000)
def test_exact_topk_is_the_brute_force_answer_and_leaves_faiss_settings_alone(metric, nq):
    import faiss

    x = clustered(2000, 200, seed=3)
    q = clustered(nq, 200, seed=4)
    before = faiss.cvar.distance_compute_blas_threshold
    scores, ids = indexing.exact_topk(x, np.arange(2000) + 10, q, 7, metric)
    assert faiss.cvar.distance_compute_blas_threshold == before
    dist = q @ x.T if metric == "ip" else ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    want = np.argsort(-dist if metric == "ip" else dist, axis=1, kind="stable")[:, :7]
    assert (ids == want + 10).mean() > 0.999  # float rounding may swap two near-equal neighbours
    np.testing.assert_allclose(scores, np.take_along_axis(dist, want, 1), rtol=1e-4, atol=1e-4)
    short = indexing.exact_topk(x[:4], np.arange(4), q, 7, metric)[1]  # fewer rows than k: padded with -1
    assert (short[:, 4:] == -1).all() and (np.sort(short[:, :4], 1) == np.arange(4)).all()


def test_write_index_streams_exactly_the_serialized_bytes(data):
    import io

    xb, _ = data
    index, _ = indexing.fill_shard(trained_bytes(xb, "ip"), xb, 0)
    stream = io.BytesIO()
    indexing.write_index(index, stream)
    assert stream.getvalue() == indexing.to_bytes(index)


def test_recall_measures():
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[1, 3, 9], [7, 8, 4]])
    assert indexing.recall_at(found, truth, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert indexing.one_recall_at_one(found, truth) == 0.5


def test_add_parts_completes_a_shard_that_holds_some_rows_already():
    x = np.random.default_rng(2).standard_normal((500, 16)).astype(np.float32)
    index = indexing.new_index("IVF4,Flat", 16, "l2")
    index.train(x)
    held = np.array([3, 7, 100, 499])
    ids = indexing.make_ids(2, len(x))
    index.add_with_ids(x[held], ids[held])
    indexing.add_parts(index, [x], ids, held)
    assert index.ntotal == len(x)
    indexing.apply_search_params(index, {"nprobe": 4})  # every list: exact
    _, found = index.search(x, 1)
    np.testing.assert_array_equal(found[:, 0], ids)  # every row once, under its own id


def test_add_parts_equals_one_add_of_the_rows_not_held(monkeypatch):
    """Parts added one by one, held rows skipped, in small reused chunks: the same lists (ids and codes, in
    order) as one ``add_with_ids`` of every row not held."""
    monkeypatch.setattr(indexing, "ADD_CHUNK_ROWS", 7)
    x = np.random.default_rng(5).standard_normal((300, 16)).astype(np.float32)
    parts = [x[:120], x[120:121], x[121:]]
    ids = indexing.make_ids(3, len(x))
    held = np.array([0, 5, 119, 120, 200, 299])
    trained = indexing.new_index("IVF4,SQ8", 16, "l2")
    trained.train(x)
    one, chunked = indexing.from_bytes(indexing.to_bytes(trained)), indexing.from_bytes(indexing.to_bytes(trained))
    rest = np.setdiff1d(np.arange(len(x)), held)
    one.add_with_ids(x[rest], ids[rest])
    indexing.add_parts(chunked, parts, ids, held)
    assert chunked.ntotal == len(rest)
    la, lb = one.invlists, chunked.invlists
    for i in range(4):
        n = la.list_size(i)
        assert lb.list_size(i) == n
        np.testing.assert_array_equal(indexing.faiss.rev_swig_ptr(lb.get_ids(i), n),
                                      indexing.faiss.rev_swig_ptr(la.get_ids(i), n))
        np.testing.assert_array_equal(indexing.faiss.rev_swig_ptr(lb.get_codes(i), n * lb.code_size),
                                      indexing.faiss.rev_swig_ptr(la.get_codes(i), n * la.code_size))
    none_held = indexing.from_bytes(indexing.to_bytes(trained))
    indexing.add_parts(none_held, parts, ids)
    assert none_held.ntotal == len(x)
    # a first part held whole (a small catalog whose every row was in the sample) adds nothing and fails nothing
    first_held = indexing.from_bytes(indexing.to_bytes(trained))
    indexing.add_parts(first_held, [x[:10], x[10:]], ids, np.arange(10))
    assert first_held.ntotal == len(x) - 10
    all_held = indexing.from_bytes(indexing.to_bytes(trained))
    indexing.add_parts(all_held, [x], ids, np.arange(len(x)))
    assert all_held.ntotal == 0
