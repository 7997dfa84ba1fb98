import math

import numpy as np
import pytest

from pipeline.query import metrics
from pipeline.query.search import ExactSearcher


def test_metrics_against_hand_computed_values():
    ranked = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"]
    # relevant at ranks 2 and 6
    m = metrics.query_metrics(ranked, ["b", "f"])
    assert m["recall@1"] == 0.0 and m["recall@5"] == 0.5 and m["recall@10"] == 1.0
    assert m["mrr"] == 0.5
    dcg = 1 / math.log2(3) + 1 / math.log2(7)
    idcg = 1 + 1 / math.log2(3)
    assert m["ndcg@10"] == pytest.approx(dcg / idcg)
    # one relevant item at rank 1: perfect
    assert metrics.query_metrics(ranked, ["a"]) == {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0,
                                                     "mrr": 1.0, "ndcg@10": 1.0}
    # relevant beyond rank 10 but retrieved: MRR counts it, the @10 metrics do not
    m = metrics.query_metrics(ranked, ["k"])
    assert m["mrr"] == pytest.approx(1 / 11) and m["recall@10"] == 0 and m["ndcg@10"] == 0
    assert metrics.query_metrics(ranked, ["zz"])["mrr"] == 0.0
    with pytest.raises(ValueError):
        metrics.recall_at(ranked, set(), 5)


def test_summary_overall_and_per_modality():
    rows = [("text", {"mrr": 1.0}), ("text", {"mrr": 0.5}), ("image", {"mrr": 0.0})]
    s = metrics.summarize(rows)
    assert s["overall"] == {"queries": 3, "mrr": 0.5}
    assert s["by_modality"] == {"image": {"queries": 1, "mrr": 0.0}, "text": {"queries": 2, "mrr": 0.75}}


def test_exact_searcher_cosine_and_l2():
    rng = np.random.default_rng(3)
    v = rng.normal(size=(50, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = [f"i{n:02d}" for n in range(50)]
    q = v[[4, 17]] + 0.01 * rng.normal(size=(2, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores, found = ExactSearcher(ids, v).search(q, 5)
    expected = np.argsort(-(q @ v.T), axis=1)[:, :5]
    assert found == [[ids[j] for j in row] for row in expected]
    assert found[0][0] == "i04" and found[1][0] == "i17"
    np.testing.assert_allclose(scores, np.take_along_axis(q @ v.T, expected, 1), atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)
    d, found_l2 = ExactSearcher(ids, v, "l2").search(q, 5)
    assert found_l2 == found  # unit vectors: same order
    np.testing.assert_allclose(d, 2 - 2 * scores, atol=1e-5)
    assert np.all(np.diff(d, axis=1) >= 0)
    s, f = ExactSearcher(ids, v).search(q[:1], 500)  # k beyond N: all items
    assert s.shape == (1, 50) and sorted(f[0]) == ids
    with pytest.raises(ValueError, match="metric"):
        ExactSearcher(ids, v, "dot")
