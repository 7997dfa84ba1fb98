"""Index choice by measurement within a memory budget, on seeded clustered vectors (no Beam)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.index import index_select, indexing
from test_indexing import clustered

K = 10


@pytest.fixture(scope="module")
def data():
    x = clustered(12_400, 32, clusters=64, noise=0.35)
    train, queries = x[400:], x[:400]
    truth = indexing.exact_topk(train, np.arange(len(train)), queries, K, "ip")[1]
    return train, queries, truth


def test_nlist_follows_faiss_guidance_and_the_sample():
    assert index_select.choose_nlist(10_000, 40_000) == (512, "")  # 4*sqrt(10k) = 400: the nearest power of 2
    assert index_select.choose_nlist(10_000, 10_000)[0] == 256  # at least 39 training points per list
    nlist, note = index_select.choose_nlist(1_000_000, 100_000)
    assert nlist == 2048 and "65536" in note  # 1M-10M: 2^16 lists by the guideline, capped by the sample
    assert index_select.choose_nlist(5_000_000, 65536 * 39)[0] == 65536
    assert index_select.choose_nlist(100, 100)[0] == 0


def test_preflight_sizes_every_candidate_before_building_anything():
    n, dim = 1_000_000, 512
    roomy, _ = index_select.plan(n, dim, 100_000, memory_gb=4.0)
    assert {c.family for c in roomy} == set(index_select.FAMILIES)
    assert [c.memory_bytes for c in roomy] == sorted(c.memory_bytes for c in roomy)
    by_family = {c.family: c for c in roomy}
    assert by_family["flat"].bytes_per_vector == 4 * dim + 8 and by_family["flat"].fits_budget  # 2 GB of 4
    assert by_family["ivf_sq8"].bytes_per_vector == dim + 8
    assert by_family["ivf_pq"].name == "IVF2048,PQ64x8np"  # the finest PQ within MAX_PQ_M
    tight, _ = index_select.plan(n, dim, 100_000, memory_gb=100 * n / (1 << 30))  # 100 bytes per vector
    fitting = [c for c in tight if c.fits_budget]
    assert {c.family for c in fitting} == {"ivf_pq", "ivf_pq_opq"}
    assert all(c.memory_bytes <= 100 * n for c in fitting)
    assert all("over the memory budget" in c.skipped_reason for c in tight if not c.fits_budget)


def test_a_tight_budget_keeps_the_fixed_part_a_small_share_and_counts_it_per_index_shard():
    n, dim = 200_000, 384
    budget_gb = 100 * n / (1 << 30)
    one, note_one = index_select.plan(n, dim, 50_000, memory_gb=budget_gb, shards=1)
    four, note_four = index_select.plan(n, dim, 50_000, memory_gb=budget_gb, shards=4)
    pq_one = next(c for c in one if c.family == "ivf_pq_opq")
    pq_four = next(c for c in four if c.family == "ivf_pq_opq")
    # four copies of the centroids, codebooks and OPQ matrix: fewer lists, and fewer bytes left for codes
    assert pq_four.nlist < pq_one.nlist and "20%" in note_four and pq_four.m < pq_one.m
    for cands, shards in ((one, 1), (four, 4)):
        c = next(c for c in cands if c.family == "ivf_pq_opq")
        fixed = c.memory_bytes - n * c.bytes_per_vector
        books = 4 * (1 << c.nbits) * c.d_out
        assert fixed == shards * (4 * c.nlist * c.d_out + 8 * c.nlist + books + 4 * dim * c.d_out)
        assert c.fits_budget and shards * (4 * dim + 8) * c.nlist <= index_select.MAX_FIXED_SHARE * 100 * n
    # 50,000 training vectors: 1024 lists; the bytes 64 sub-quantizers would leave go to 8 more (OPQ72_360)
    assert (pq_one.m, pq_one.nbits, pq_one.d_out) == (72, 8, 360) and pq_one.memory_bytes <= 100 * n


def test_a_tight_budget_spends_the_whole_budget_on_the_codes():
    """200k x 384 at 100 B/vector: IVF2048's centroids cost 15.7 B/vector, the rotation ~3; OPQ72 to 360
    dimensions is the largest code that fits, plain PQ keeps a divisor of 384."""
    n, dim = 200_000, 384
    cands = {c.family: c for c in index_select.plan(n, dim, 100_000, memory_gb=100 * n / (1 << 30))[0]}
    opq, pq = cands["ivf_pq_opq"], cands["ivf_pq"]
    assert opq.name == "OPQ72_360,IVF2048,PQ72x8np" and opq.fits_budget and opq.memory_bytes <= 100 * n
    assert pq.name == "IVF2048,PQ64x8np" and pq.fits_budget
    params = opq.params("ip", dim)
    assert params.factory == opq.name and params.opq and (params.m, params.nlist) == (72, 2048)


@pytest.mark.parametrize("dim", [32, 100, 384, 512, 768])
@pytest.mark.parametrize("n", [20_000, 200_000, 1_000_000])
@pytest.mark.parametrize("per_vector", [24, 40, 64, 100, 160])
def test_pq_sizing_fits_divides_and_leaves_no_larger_code(dim, n, per_vector):
    budget = per_vector * n
    n_train = min(n, 100_000)
    cands, _ = index_select.plan(n, dim, n_train, memory_gb=budget / (1 << 30))
    sq8_fits = any(c.family == "ivf_sq8" and c.fits_budget for c in cands)
    base_nlist = next(c.nlist for c in cands if c.family == "ivf_sq8")
    for c in cands:
        if c.family not in ("ivf_pq", "ivf_pq_opq"):
            continue
        opq = c.family == "ivf_pq_opq"
        assert c.d_out % c.m == 0 and c.d_out // c.m >= index_select.MIN_SUB_DIMS  # faiss's PQ: M divides d_out
        assert opq or (c.d_out == dim and dim % c.m == 0)
        assert c.nlist <= base_nlist and c.nlist >= index_select.min_nlist(n, base_nlist)
        expected = (f"OPQ{c.m}{'' if c.d_out == dim else f'_{c.d_out}'}," if opq else "") + \
            f"IVF{c.nlist},PQ{c.m}x{c.nbits}np"
        assert c.name == expected
        if not c.fits_budget:
            continue
        assert c.memory_bytes <= budget
        if sq8_fits:  # a roomy budget keeps today's shape: at most MAX_PQ_M sub-quantizers over today's lists
            assert c.m <= index_select.MAX_PQ_M and c.nlist == base_nlist
            continue
        # no larger M fits anywhere in the allowed lists
        step = index_select.PQ_M_STEP if opq and c.m >= index_select.PQ_M_STEP else 1
        for m in range(c.m + step, dim + 1, step):
            if not opq and (dim % m or dim // m < index_select.MIN_SUB_DIMS):
                continue
            for d_out in (index_select._d_outs(dim, m) if opq else [dim]):
                shape = index_select.PQShape(index_select.min_nlist(n, base_nlist), m, c.nbits, d_out)
                assert index_select._pq_bytes(n, dim, shape, opq, 1)[1] > budget, (c.name, m, d_out)


def test_pq_sizing_falls_back_to_todays_shapes_when_nothing_larger_fits():
    n, dim = 200_000, 384
    roomy = {c.family: c.name for c in index_select.plan(n, dim, 100_000, memory_gb=4.0)[0]}
    assert roomy["ivf_pq"] == "IVF2048,PQ64x8np" and roomy["ivf_pq_opq"] == "OPQ64,IVF2048,PQ64x8np"
    # 50 B/vector: the centroids' 20% share halves the lists to 1024, below 4*sqrt(N), so they stay; the rotation's
    # bytes leave OPQ the 24 sub-quantizers of before, plain PQ (no rotation to store) gets 32
    tight = {c.family: c for c in index_select.plan(n, dim, 100_000, memory_gb=50 * n / (1 << 30))[0]}
    assert tight["ivf_pq_opq"].name == "OPQ24,IVF1024,PQ24x8np" and tight["ivf_pq_opq"].fits_budget
    assert tight["ivf_pq"].name == "IVF1024,PQ32x8np" and tight["ivf_pq"].fits_budget
    # nothing fits at all: today's shapes, recorded as over the budget (the run then says no candidate fits)
    none = {c.family: c for c in index_select.plan(n, dim, 100_000, memory_gb=5 * n / (1 << 30))[0]}
    assert not none["ivf_pq"].fits_budget and none["ivf_pq"].m == 64
    assert "over the memory budget" in none["ivf_pq_opq"].skipped_reason


def test_a_smaller_nlist_frees_bytes_for_a_larger_code():
    """Where the next M fits only with fewer lists (still >= 4*sqrt(N)), the lists shrink in steps of NLIST_STEP."""
    n, dim = 200_000, 384
    shape = index_select.size_pq(n, dim, 100 * n, 1, 2048, index_select.min_nlist(n, 2048), 8, True, dim)
    assert shape == index_select.PQShape(2048, 72, 8, 360)
    budget = index_select._pq_bytes(n, dim, index_select.PQShape(1856, 80, 8, 400), True, 1)[1]
    shape = index_select.size_pq(n, dim, budget, 1, 2048, index_select.min_nlist(n, 2048), 8, True, dim)
    assert shape is not None and shape.m == 80 and shape.nlist % index_select.NLIST_STEP == 0
    assert index_select.min_nlist(n, 2048) <= shape.nlist < 2048
    assert index_select._pq_bytes(n, dim, shape, True, 1)[1] <= budget


def test_the_cheapest_candidate_that_meets_the_target_wins(data):
    train, queries, truth = data
    # OPQ's training is the slow one (test_opq_shares_the_rotated_coarse_quantizer covers it)
    families = [f for f in index_select.FAMILIES if f != "ivf_pq_opq"]
    sel = index_select.select(200_000, 32, train, [index_select.QuerySet("held_out", queries, truth)],
                              metric="ip", memory_gb=1.0, target=0.95, max_query_ms=50, families=families)
    chosen = next(c for c in sel.candidates if c["name"] == sel.chosen["name"])
    assert chosen["meets_target"] and sel.chosen["params"] == chosen["best_setting"]
    best = [r for r in chosen["settings"] if r["params"] == chosen["best_setting"]]
    assert best and all(r["recall_at_10"] >= 0.95 for r in best)
    for c in sel.candidates:
        if c["memory_bytes"] < chosen["memory_bytes"]:  # every cheaper one was measured and missed
            assert c["settings"] and not c["meets_target"], c
        elif c["memory_bytes"] > chosen["memory_bytes"]:  # a costlier one cannot win: not even trained
            assert not c["settings"] and "not measured" in c["skipped_reason"]
    assert "least memory" in sel.chosen["why"]
    # the returned index is the winner, trained and empty: the shards are filled from it
    assert sel.index.ntotal == 0 and sel.index.is_trained and sel.params.factory == chosen["name"]
    index, _ = indexing.fill_shard(sel.index, train, 0)
    sharded = indexing.ShardedIndex([index], "ip")
    sharded.set_params(sel.chosen["params"])
    assert indexing.recall_at(sharded.search(queries, K)[1], truth, K) >= 0.9


def test_a_tight_budget_keeps_to_it_and_says_when_the_target_is_missed(data):
    train, queries, truth = data
    n = 200_000
    sel = index_select.select(n, 32, train, [index_select.QuerySet("held_out", queries, truth)],
                              metric="ip", memory_gb=20 * n / (1 << 30), target=0.999, max_query_ms=50,
                              families=("flat", "ivf_sq8", "ivf_pq"))
    assert sel.params.estimated_bytes <= 20 * n and sel.chosen["family"] == "ivf_pq"
    assert [c["family"] for c in sel.candidates if c["fits_budget"]] == ["ivf_pq"]
    assert not sel.chosen["meets_target"] and "no candidate reached" in sel.chosen["why"]
    with pytest.raises(indexing.IndexParamsError, match="no index candidate fits"):
        index_select.select(n, 32, train, [index_select.QuerySet("held_out", queries, truth)],
                            metric="ip", memory_gb=1e-6, target=0.9, max_query_ms=50)


def test_opq_shares_the_rotated_coarse_quantizer():
    x = clustered(2600, 16, clusters=16, noise=0.3, seed=3)
    train, queries = x[200:], x[:200]
    truth = indexing.exact_topk(train, np.arange(len(train)), queries, K, "ip")[1]
    (cand,) = [c for c in index_select.plan(len(train), 16, len(train), 1.0)[0] if c.family == "ivf_pq_opq"]
    centroids = index_select._trained_quantizer(cand.nlist, 16, "ip", train)
    index = index_select.train_candidate(cand, 16, "ip", train, centroids)
    ivf = indexing.faiss.extract_index_ivf(index)
    assert ivf.quantizer.ntotal == cand.nlist  # the shared centroids, rotated, not trained again
    rotation = indexing.faiss.downcast_VectorTransform(indexing.faiss.downcast_index(index).chain.at(0))
    np.testing.assert_allclose(ivf.quantizer.reconstruct_n(0, cand.nlist), rotation.apply(centroids), atol=1e-5)
    recall = {}
    for name, empty in (("opq", index), ("pq", indexing.train_index(indexing.params_for_factory(
            cand.name.partition(",")[2], "ip", 16, len(train)), train))):
        sharded = indexing.ShardedIndex([indexing.fill_shard(empty, train, 0)[0]], "ip")
        recall[name] = indexing.recall_at(sharded.search(queries, K, nprobe=cand.nlist)[1], truth, K)
    assert recall["opq"] >= 0.9 * recall["pq"] and recall["pq"] > 0.1, recall  # the rotation costs no recall


def test_the_harder_query_set_decides(data):
    train, queries, truth = data
    far = clustered(300, 32, clusters=64, noise=0.35, seed=7)  # other centres: harder than held-out rows
    far_truth = indexing.exact_topk(train, np.arange(len(train)), far, K, "ip")[1]
    sets = [index_select.QuerySet("held_out", queries, truth), index_select.QuerySet("recall_queries", far, far_truth)]
    sel = index_select.select(200_000, 32, train, sets, metric="ip", memory_gb=1.0, target=0.95, max_query_ms=50,
                              families=("ivf_sq8",))
    (cand,) = sel.candidates
    assert {r["query_set"] for r in cand["settings"]} == {"held_out", "recall_queries"}
    best = [r for r in cand["settings"] if r["params"] == cand["best_setting"]]
    assert min(r["recall_at_10"] for r in best) >= 0.95 and sel.chosen["query_set"] == "recall_queries"
    # held-out rows alone would have stopped at a smaller nprobe
    held = [r for r in cand["settings"] if r["query_set"] == "held_out" and r["recall_at_10"] >= 0.95]
    assert min(r["params"]["nprobe"] for r in held) <= cand["best_setting"]["nprobe"]


@pytest.mark.parametrize("family", ["hnsw", "ivf_pq_refine", "flat_fp16"])
def test_non_ivf_and_refined_shards_are_searched_together(data, family):
    train, queries, truth = data
    cand = next(c for c in index_select.plan(len(train), 32, len(train), 1.0)[0] if c.family == family)
    empty = index_select.train_candidate(cand, 32, "ip", train, None)
    parts = np.array_split(np.arange(len(train)), 3)
    shards = [indexing.fill_shard(empty, train[rows], s)[0] for s, rows in enumerate(parts)]
    row_id = np.concatenate([indexing.make_ids(s, len(rows)) for s, rows in enumerate(parts)])
    sharded = indexing.ShardedIndex(shards, "ip")
    params = {"hnsw": {"efSearch": 128}, "ivf_pq_refine": {"nprobe": 16, "k_factor": 8}, "flat_fp16": {}}[family]
    sharded.set_params(params)
    found = sharded.search(queries, K)[1]
    assert indexing.recall_at(found, row_id[truth], K) >= 0.9
    with pytest.raises(ValueError, match="not one of"):
        sharded.set_params({"nprobes": 3})


def test_recommended_setting_is_the_fastest_meeting_the_target_on_every_query_set():
    rows = [{"params": {"nprobe": p}, "nprobe": p, "query_set": qs, "recall_10_at_10": r, "ms_per_query": ms}
            for p, qs, r, ms in [(1, "held_out", 0.96, 0.1), (1, "recall_queries", 0.80, 0.1),
                                 (4, "held_out", 0.99, 0.3), (4, "recall_queries", 0.96, 0.3),
                                 (8, "held_out", 0.99, 0.6), (8, "recall_queries", 0.97, 0.6)]]
    assert indexing.recommend_setting(rows, 0.95) == ({"nprobe": 4}, True)
    assert indexing.recommend_setting(rows, 0.95, max_query_ms=0.2) == ({"nprobe": 1}, False)
    assert indexing.recommend_setting(rows, 0.999) == ({"nprobe": 8}, False)


@pytest.mark.parametrize("family", ["ivf_pq", pytest.param("ivf_pq_opq", marks=pytest.mark.slow),  # OPQ: ~20 s here
                                    "ivf_sq8", "ivf_pq_refine", "flat_fp16", "hnsw"])
def test_preflight_matches_the_written_shard_files(family):
    """The estimate for a sharded build counts each shard's own coarse quantizer, codebooks and OPQ matrix."""
    n, dim, shards = 20_000, 32, 4
    x = clustered(n, dim, clusters=32, noise=0.3, seed=11)
    budget = 100 * n / (1 << 30)  # tight: PQ's size depends on the room the fixed parts leave
    train = x[:2000]  # a small sample keeps training quick: 32 lists, 5-bit PQ codes
    plan = {c.family: c for c in index_select.plan(n, dim, len(train), budget, shards=shards)[0][::-1]}
    cand = plan[family]
    centroids = index_select._trained_quantizer(cand.nlist, dim, "ip", train) if cand.ivf else None
    empty = indexing.to_bytes(index_select.train_candidate(cand, dim, "ip", train, centroids))
    written = sum(len(indexing.to_bytes(indexing.fill_shard(empty, x[rows], s)[0]))
                  for s, rows in enumerate(np.array_split(np.arange(n), shards)))
    assert abs(cand.memory_bytes - written) <= 0.05 * written, (cand.name, cand.memory_bytes, written)
    if family in ("ivf_pq", "ivf_pq_opq"):
        assert cand.memory_bytes <= budget * (1 << 30)  # the largest PQ that fits, fixed parts included
        one = {c.name: c for c in index_select.plan(n, dim, len(train), budget, shards=1)[0]}.get(cand.name)
        if one is not None:  # the same index counted as one shard would undercount the files
            assert one.memory_bytes < 0.95 * written


def test_pq_probe_skips_a_far_candidate_only_when_a_costlier_family_fits():
    """The probe's ceiling (a sub-sample, every list scanned) stands in for the full PQ candidate's, and skips it
    only with a fallback in the budget."""
    n, dim = 20_000, 32
    x = clustered(n + 300, dim, clusters=64, noise=0.35, seed=5)
    train, queries = x[300:], x[:300]
    sets = [index_select.QuerySet("held_out", queries,
                                  indexing.exact_topk(train, np.arange(n), queries, K, "ip")[1])]
    roomy = index_select.plan(n, dim, n, 1.0)[0]
    pq = next(c for c in roomy if c.family == "ivf_pq")
    entry: dict = {}
    why = index_select._pq_probe_says_skip(pq, entry, roomy, dim, "ip", train, sets, 0.999, K, lambda _: None)
    ceiling = entry["probe"]["recall_at_10"]["held_out"]
    assert entry["probe"]["rows"] == index_select.PROBE_ROWS and entry["probe"]["nlist"] < pq.nlist
    # the full candidate, every list scanned: the probe is within a few points of its ceiling
    full = index_select.train_candidate(pq, dim, "ip", train, None)
    sharded = indexing.ShardedIndex([indexing.fill_shard(full, train, 0)[0]], "ip")
    full_ceiling = indexing.recall_at(sharded.search(queries, K, nprobe=pq.nlist)[1], sets[0].truth, K)
    assert abs(ceiling - full_ceiling) < 0.08, (ceiling, full_ceiling)
    assert ceiling < 0.999 - index_select.PROBE_MARGIN and why and "probe" in why
    # a target the probe reaches: trained in full
    assert index_select._pq_probe_says_skip(pq, {}, roomy, dim, "ip", train, sets, ceiling, K, print) is None
    # nothing costlier fits: never skipped, whatever the probe would say
    only_pq = [c for c in roomy if c.family in ("ivf_pq", "ivf_pq_opq")]
    assert index_select._pq_probe_says_skip(pq, {}, only_pq, dim, "ip", train, sets, 0.999, K, print) is None


@pytest.mark.parametrize("nlist, top", [(4, 4), (512, 512), (1000, 1000), (2048, 2048)])
def test_the_nprobe_ladder_can_scan_every_list(nlist, top):
    ladder = index_select.nprobe_ladder(nlist)
    assert ladder[0] == 1 and ladder[-1] == top and ladder == sorted(set(ladder))
    assert set(indexing.DEFAULT_NPROBES) & set(range(nlist + 1)) <= set(ladder)
    cand = index_select.Candidate(f"IVF{nlist},PQ8x8np", "ivf_pq", 16, 0, True, nlist=nlist)
    assert index_select.settings_ladder(cand)[0][-1] == {"nprobe": top}


def test_settings_are_measured_on_a_quarter_of_the_queries_unless_too_close_to_call(data):
    train, queries, truth = data  # 400 queries
    cand = next(c for c in index_select.plan(len(train), 32, len(train), 1.0)[0] if c.family == "ivf_sq8")
    centroids = index_select._trained_quantizer(cand.nlist, 32, "ip", train)
    empty = index_select.train_candidate(cand, 32, "ip", train, centroids)
    sharded = indexing.ShardedIndex([indexing.fill_shard(empty, train, 0)[0]], "ip")
    lazy = index_select.QuerySet("held_out", queries, database=train, metric="ip", k=K)
    (row,) = index_select.measure_staged(sharded, [lazy], {"nprobe": 4}, K, target=0.0, step=100)
    assert row["queries"] == 100 and row["confident"] and row["recall_se"] > 0
    assert lazy.truth is not None and len(lazy.truth) == 100  # ground truth only for the queries measured
    assert indexing.recall_at(lazy.truth, truth[:100], K) > 0.99
    (close,) = index_select.measure_staged(sharded, [lazy], {"nprobe": 4}, K, target=row["recall_at_10"], step=100)
    assert not close["confident"]
    (full,) = index_select.measure_staged(sharded, [lazy], {"nprobe": 4}, K, target=row["recall_at_10"], full=True)
    assert full["queries"] == 400 and full["confident"] and len(lazy.truth) == 400
    # a selection decides on confident rows only: the winner's best setting is one
    sel = index_select.select(200_000, 32, train, [index_select.QuerySet("held_out", queries, database=train)],
                              metric="ip", memory_gb=1.0, target=0.95, max_query_ms=50, families=("ivf_sq8",))
    (entry,) = sel.candidates
    assert {r["queries"] for r in entry["settings"]} <= {index_select.QUERY_STEP, len(queries)}
    assert all(r["confident"] for r in entry["settings"] if r["params"] == entry["best_setting"])
    assert entry["meets_target"] and min(r["recall_at_10"] for r in entry["settings"]
                                         if r["params"] == entry["best_setting"]) >= 0.95


def test_the_opq_rotation_trains_with_the_capped_settings(monkeypatch):
    """The rotation is trained on at most CODEBOOK_POINTS_PER_CENTROID x 256 points for OPQ_NITER iterations
    (faiss's defaults are 65,536 points and 50 iterations), whether or not the coarse centroids are shared."""
    seen = []
    real = indexing.faiss.VectorTransform.train

    def spy(self, x):
        opq = indexing.faiss.downcast_VectorTransform(self)
        seen.append((opq.niter, opq.max_train_points))
        return real(self, x)

    monkeypatch.setattr(indexing.faiss.VectorTransform, "train", spy)
    x = clustered(2600, 16, clusters=16, noise=0.3, seed=3)
    (cand,) = [c for c in index_select.plan(len(x), 16, len(x), 1.0)[0] if c.family == "ivf_pq_opq"]
    centroids = index_select._trained_quantizer(cand.nlist, 16, "ip", x)
    index_select.train_candidate(cand, 16, "ip", x, centroids)
    assert seen == [(index_select.OPQ_NITER, index_select.CODEBOOK_POINTS_PER_CENTROID * 256)]
