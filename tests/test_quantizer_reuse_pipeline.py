"""The index stage reuses the previous run's trained quantizer only when the measured drift allows.

Real pipeline runs with the tiny random models on a 600-item text catalog
(IVF-PQ forced small: IVF4,PQ4x3 trains on a handful of vectors) and 256
held-out rows, the least the decision measures on. Drift is real, not
simulated: the drifted catalog's titles come from another vocabulary, which
moves the random encoders' vectors elsewhere.
"""
from __future__ import annotations

import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.index import indexing
from pipeline.config import IndexConfig
from pipeline.index.quantizer_reuse import PreviousQuantizer, decide, manifest_block
from schemas.catalog import CATALOG_SCHEMA
from test_incremental import run

WORDS = "red blue green mug bag lamp sock cup shirt shoe hat chair table pen book phone".split()
OTHER_WORDS = "quantum zebra 7731 xylophone ##q ∑ 北京 東京 volcano 0x9f nebula ✓ τ ω cobalt".split()
ITEMS = 600
IVFPQ = ("--index_nlist", "4", "--index_m", "4", "--index_nbits", "3", "--index_queries", "256",
         "--batch_size", "64")


def _catalog(root, name: str, words: list[str], seed: int, n: int = ITEMS) -> str:
    rng = random.Random(seed)
    rows = [{"item_id": f"i{i:04d}", "title": " ".join(rng.choice(words) for _ in range(4)), "description": None,
             "image_uris": None, "audio_uri": None} for i in range(n)]
    path = os.path.join(str(root), f"{name}.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA), path)
    return path


def _trained_bytes(out, run_id: str) -> bytes:
    with open(os.path.join(str(out), "runs", run_id, "index", "trained.faiss"), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def nights(tmp_path_factory, tiny_text_dir):
    """Night 1 trains; night 2 (same catalog) reuses; night 3 (every title redrawn, same vocabulary) reuses."""
    root = tmp_path_factory.mktemp("qcatalog")
    out = tmp_path_factory.mktemp("qout")
    catalog = _catalog(root, "day", WORDS, seed=0)
    first = run(catalog, out, "n1", tiny_text_dir, *IVFPQ)
    second = run(catalog, out, "n2", tiny_text_dir, *IVFPQ)
    third = run(_catalog(root, "redrawn", WORDS, seed=5), out, "n3", tiny_text_dir, *IVFPQ)
    return {"root": root, "out": out, "catalog": catalog, "n1": first, "n2": second, "n3": third}


@pytest.mark.slow
def test_first_run_trains_and_records_a_held_out_baseline(nights):
    _, manifest, _ = nights["n1"]
    index, q = manifest["index"], manifest["index"]["quantizer"]
    assert index["factory"] == "IVF4,PQ4x3np" and index["training"]["vectors"] > 0
    assert q["applicable"] and not q["reused"] and "no previous run" in q["reason"]
    assert q["held_out_vectors"] == 256 and q["trained_run_id"] == "n1"
    assert q["model_fingerprint"] == manifest["model_fingerprint"]
    assert q["baseline_error"] > 0 and q["baseline_error"] == q["held_out_error"]


@pytest.mark.slow
def test_same_model_and_data_reuses_the_quantizer(nights):
    table, manifest, _ = nights["n2"]
    _, first, _ = nights["n1"]
    q, index = manifest["index"]["quantizer"], manifest["index"]
    assert q["reused"] and q["reuse"] and q["reused_from_run_id"] == "n1" and q["trained_run_id"] == "n1"
    # the same held-out items through the same quantizer: the same error, exactly
    assert q["error_ratio"] == 1.0 and q["sample_error"] == first["index"]["quantizer"]["baseline_error"]
    assert q["baseline_error"] == first["index"]["quantizer"]["baseline_error"]
    assert index["training"]["vectors"] == 0
    assert _trained_bytes(nights["out"], "n2") == _trained_bytes(nights["out"], "n1")
    # the index itself is rebuilt for this run: every vector, its own shards, a recall table
    assert index["ntotal"] == manifest["counts"]["embedded"] == table.num_rows == ITEMS
    assert index["recall"]["table"] and index["recall"]["held_out"]
    assert all(os.path.exists(os.path.join(str(nights["out"]), "runs", "n2", s["index"])) for s in index["shards"])
    listed = {f["path"] for f in manifest["files"]}
    assert "index/trained.faiss" in listed  # the run is self-contained: n1 may be deleted by retention


@pytest.mark.slow
def test_redrawn_catalog_from_the_same_distribution_still_reuses(nights):
    _, manifest, _ = nights["n3"]
    _, first, _ = nights["n1"]
    q = manifest["index"]["quantizer"]
    assert manifest["counts"]["incremental"]["changed"] == ITEMS  # every vector is new...
    assert q["reused"] and q["reused_from_run_id"] == "n2" and q["trained_run_id"] == "n1"
    assert q["error_ratio"] != 1.0 and q["error_ratio"] <= 1 + q["tolerance"]  # ...measured, within tolerance
    # the baseline stays the one measured at training time, so drift adds up over nights
    assert q["baseline_error"] == first["index"]["quantizer"]["baseline_error"]
    assert q["held_out_error"] == q["sample_error"]


@pytest.mark.slow
def test_drifted_catalog_retrains(nights, tiny_text_dir):
    drifted = _catalog(nights["root"], "drifted", OTHER_WORDS, seed=1)
    _, manifest, _ = run(drifted, nights["out"], "drift", tiny_text_dir, *IVFPQ)
    q, index = manifest["index"]["quantizer"], manifest["index"]
    assert not q["reused"] and "drifted" in q["reason"] and q["error_ratio"] > 1 + q["tolerance"]
    assert q["trained_run_id"] == "drift" and index["training"]["vectors"] > 0
    assert q["baseline_error"] == q["held_out_error"] != q["previous_error"]  # a fresh baseline for tomorrow
    assert _trained_bytes(nights["out"], "drift") != _trained_bytes(nights["out"], "n1")
    assert index["recall"]["table"] and index["ntotal"] == ITEMS


@pytest.mark.slow
def test_model_change_retrains_and_says_why(nights, tiny_text_dir, tmp_path):
    previous = os.path.join(str(nights["out"]), "runs", "n2")
    _, manifest, _ = run(nights["catalog"], tmp_path, "model", tiny_text_dir, *IVFPQ,
                         "--previous_run", previous, "--text_weights", "random")
    q = manifest["index"]["quantizer"]
    assert not q["reused"] and "not comparable" in q["reason"] and "model_fingerprint" in q["reason"]
    assert q["model_fingerprint"] == manifest["model_fingerprint"] != nights["n2"][1]["model_fingerprint"]
    assert manifest["index"]["recall"]["table"]


@pytest.mark.slow
def test_reuse_never_and_tolerance_options(nights, tiny_text_dir, tmp_path):
    previous = os.path.join(str(nights["out"]), "runs", "n3")
    _, never, _ = run(nights["catalog"], tmp_path, "never", tiny_text_dir, *IVFPQ,
                      "--previous_run", previous, "--reuse_quantizer", "never")
    q = never["index"]["quantizer"]
    assert not q["reused"] and "never" in q["reason"] and q["reuse_setting"] == "never"
    assert q["baseline_error"] is not None  # still recorded, so a later auto run can compare
    # the redrawn night measured a ratio a little over 1; a tolerance below it retrains
    ratio = nights["n3"][1]["index"]["quantizer"]["error_ratio"]
    strict = f"{max(ratio - 1, 0) / 2:.6f}"
    _, tight, _ = run(_catalog(nights["root"], "redrawn", WORDS, seed=5), tmp_path, "tight", tiny_text_dir,
                      *IVFPQ, "--previous_run", os.path.join(str(nights["out"]), "runs", "n2"),
                      "--quantizer_drift_tolerance", strict)
    q = tight["index"]["quantizer"]
    assert not q["reused"] and "drifted" in q["reason"] and q["tolerance"] == float(strict)


@pytest.mark.slow
def test_flat_fallback_has_no_quantizer(tiny_text_dir, tmp_path):
    catalog = _catalog(tmp_path, "small", WORDS, seed=0, n=30)
    _, manifest, _ = run(catalog, tmp_path / "out", "flat", tiny_text_dir)
    q = manifest["index"]["quantizer"]
    assert manifest["index"]["kind"] == "flat"
    assert q["applicable"] is False and q["reused"] is False and "flat" in q["reason"]


# --------------------------------------------------------------------------- the decision without Beam


@pytest.fixture(scope="module")
def trained_ivfpq():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    params = indexing.choose_params(2000, 16, 1700, nlist=8, m=4, nbits=4)
    index = indexing.train_index(params, x[300:])
    return params, index, x[:300]


def _previous(params, baseline=0.1, **changes) -> PreviousQuantizer:
    fields = dict(run_id="prev", trained_path="/nowhere/trained.faiss", sha256=None, factory=params.factory,
                  metric=params.metric, kind="ivfpq", model_fingerprint="fp", baseline_error=baseline,
                  trained_run_id="older")
    return PreviousQuantizer(**{**fields, **changes})


@pytest.mark.parametrize("case,reason", [
    ("params", "index parameters changed"), ("flat", "exact flat index"), ("no_baseline", "no held-out"),
    ("unreadable", "unusable"), ("never", "never"), ("none", "no previous run"), ("small", "below the 256")])
def test_refusals_before_measuring_name_their_reason(trained_ivfpq, case, reason):
    params, index, held_out = trained_ivfpq
    previous, load, setting, sample = _previous(params), (lambda: index), "auto", held_out

    def broken():
        raise OSError("no such file")

    if case == "params":
        previous = _previous(params, factory="IVF16,PQ4x4np")
    elif case == "flat":
        previous = _previous(params, kind="flat")
    elif case == "no_baseline":
        previous = _previous(params, baseline=None)
    elif case == "unreadable":
        load = broken
    elif case == "never":
        setting = "never"
    elif case == "none":
        previous = None
    elif case == "small":
        sample = held_out[:100]
    decision, reused = decide(previous, load, sample, factory=params.factory, metric=params.metric,
                              model_fingerprint="fp", setting=setting, unavailable="")
    assert not decision.reuse and reused is None and reason in decision.reason


def test_measured_decision_returns_the_index_to_reuse(trained_ivfpq):
    params, index, held_out = trained_ivfpq
    from pipeline.index.quantizer_reuse import quantization_error

    baseline = quantization_error(index, held_out)
    decision, reused = decide(_previous(params, baseline=baseline), lambda: index, held_out, factory=params.factory,
                              metric=params.metric, model_fingerprint="fp")
    assert decision.reuse and reused is index and decision.error_ratio == 1.0
    block = manifest_block(decision, setting="auto", model_fingerprint="fp", previous=_previous(params, baseline),
                           fresh_error=decision.sample_error, held_out_vectors=len(held_out), run_id="now")
    assert block["reused"] and block["reused_from_run_id"] == "prev" and block["trained_run_id"] == "older"
    assert block["baseline_error"] == baseline
    # another model fingerprint: refused although the error would pass
    decision, reused = decide(_previous(params, baseline=baseline), lambda: index, held_out, factory=params.factory,
                              metric=params.metric, model_fingerprint="other")
    assert not decision.reuse and reused is None and "model" in decision.reason


def test_index_config_validates_reuse_options():
    with pytest.raises(ValueError, match="reuse_quantizer 'sometimes' is not one of"):
        IndexConfig(reuse_quantizer="sometimes")
    with pytest.raises(ValueError, match="tolerance must be in"):
        IndexConfig(quantizer_drift_tolerance=-0.1)


def test_a_trained_index_changed_since_its_manifest_is_refused(trained_ivfpq, tmp_path):
    import hashlib

    from pipeline.stages.index import _load_trained

    params, index, held_out = trained_ivfpq
    path = tmp_path / "trained.faiss"
    data = indexing.to_bytes(index)
    path.write_bytes(data)
    good = _previous(params, trained_path=str(path), sha256=hashlib.sha256(data).hexdigest())
    assert _load_trained(good).ntotal == 0
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    decision, reused = decide(good, lambda: _load_trained(good), held_out, factory=params.factory,
                              metric=params.metric, model_fingerprint="fp")
    assert not decision.reuse and reused is None and "sha256" in decision.reason
