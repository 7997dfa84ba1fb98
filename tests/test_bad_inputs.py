"""The pipeline over the bad-input catalog: every row's fate, and counts that add up."""
from __future__ import annotations

import collections
import glob
import json
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from encoders.handlers import TextEmbeddingHandler
from pipeline import cli
from pipeline.graph import build
from pipeline.options import to_run_config
from schemas.dead_letter import Reason, Stage
from schemas.embeddings import vectors_of
from tests import bad_inputs
from tests.conftest import tiny_run_argv



class TriggerTextHandler(TextEmbeddingHandler):
    """The real sentence encoder, except: NaN for NAN_TRIGGER texts, an exception for RAISE_TRIGGER ones.

    The exception fails whatever batch the item is in; the handler's
    item-by-item retry (unit-tested in test_handlers.py) keeps its batch-mates.
    """

    def _encode(self, model, batch):
        if any(bad_inputs.RAISE_TRIGGER in str(t) for t in batch):
            raise ValueError("model refused this input")
        out = super()._encode(model, batch)
        for i, t in enumerate(batch):
            if bad_inputs.NAN_TRIGGER in str(t):
                out[i] = np.nan
        return out


def _argv(catalog, out, run_id, text_dir, *extra):
    return tiny_run_argv(catalog, out, run_id, text_dir, *bad_inputs.RUN_OPTIONS, *extra, command=False)


@pytest.fixture(scope="module")
def bad_catalog(tmp_path_factory):
    return bad_inputs.build(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def bad_run(bad_catalog, tiny_text_dir, tmp_path_factory):
    """One run over the bad catalog with the trigger handler on text->text, publishing whatever fails."""
    catalog, _ = bad_catalog
    out = tmp_path_factory.mktemp("out")
    options = PipelineOptions(_argv(catalog, out, "bad", tiny_text_dir, "--max_failure_fraction", "1"))
    config, _ = to_run_config(options)
    route = next(r for r in config.encode.routes if (r.modality, r.space) == ("text", "text"))
    handler = TriggerTextHandler(route.spec, device="cpu", batch_size=8)
    with beam.Pipeline(options=options) as p:
        build(p, config, model_handlers={route: handler})
    run_dir = os.path.join(str(out), "runs", "bad")
    table = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(f"{run_dir}/embeddings/*.parquet"))])
    dead = pa.concat_tables([pq.read_table(f) for f in glob.glob(f"{run_dir}/dead_letter/*.parquet")]).to_pylist()
    with open(f"{run_dir}/manifest.json") as f:
        manifest = json.load(f)
    return table, dead, manifest


def _case(dead_row) -> str:
    """The EXPECTED key of a dead-letter row."""
    if dead_row["item_id"].startswith("<row "):
        return "<float id>" if "part-4-id" in dead_row["source"] else "<null id>"
    if dead_row["reason"] == "duplicate_id":
        return dead_row["item_id"] + "#2"
    return dead_row["item_id"]


def test_every_row_has_its_expected_fate(bad_run):
    table, dead, _ = bad_run
    fates = {item_id: "embedded" for item_id in table.column("item_id").to_pylist()}
    for row in dead:
        key = _case(row)
        assert key not in fates, f"{key} has two fates: {fates[key]} and {row}"
        fates[key] = (row["stage"], row["reason"])
    assert fates == bad_inputs.EXPECTED


def test_counts_add_up_and_match_the_rows(bad_run, bad_catalog):
    table, dead, manifest = bad_run
    _, n_rows = bad_catalog
    counts = manifest["counts"]
    assert counts["input_rows"] == n_rows == len(bad_inputs.EXPECTED)
    assert counts["embedded"] == table.num_rows
    assert counts["dead_letters"] == dict(collections.Counter(r["reason"] for r in dead))
    assert counts["embedded"] + sum(counts["dead_letters"].values()) + counts["skipped"] == n_rows
    assert manifest["accounting"]["failed_fraction"] == pytest.approx(len(dead) / n_rows, abs=1e-6)
    assert np.all(np.isfinite(vectors_of(table)))


def test_dead_letters_are_complete_rows(bad_run):
    _, dead, _ = bad_run
    reasons, stages = {r.value for r in Reason}, {s.value for s in Stage}
    for row in dead:
        assert row["reason"] in reasons and row["stage"] in stages
        assert row["detail"] and row["source"], row
    by_id = {r["item_id"]: r for r in dead}
    assert by_id["traversal"]["source"].endswith("/etc/passwd")  # the resolved URI at fault
    assert "outside the allowed media roots" in by_id["symlink-escape"]["detail"]
    assert "metadata" in by_id["metadata-http"]["detail"]
    assert "allowed hosts" in by_id["host-not-allowed"]["detail"]
    assert "column 'title'" in by_id["wrong-title"]["detail"]
    assert "nonfinite" not in by_id["raise-text"]["detail"]


def test_no_secret_bytes_reach_the_output(bad_run, bad_catalog):
    table, _, _ = bad_run
    assert "symlink-escape" not in table.column("item_id").to_pylist()
    assert "absolute-outside" not in table.column("item_id").to_pylist()


def test_too_many_failures_publish_nothing(bad_catalog, tiny_text_dir, tmp_path, capsys):
    catalog, _ = bad_catalog
    (tmp_path / "LATEST").write_text("previous-good-run\n")
    status = cli.main(["run", *_argv(catalog, tmp_path, "refused", tiny_text_dir)])  # default threshold
    assert status == cli.EXIT_NOT_PUBLISHED
    err = capsys.readouterr().err
    assert "NOT published" in err and "Traceback" not in err  # one line and a hint, not Beam's traceback
    # the run's own lines (index stage) may come first; the failure is the last two lines
    assert [line.split(":")[0] for line in err.splitlines()[-2:]] == ["error", "hint"]
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1
    assert (tmp_path / "LATEST").read_text() == "previous-good-run\n"
    assert not (tmp_path / "runs" / "refused" / "manifest.json").exists()
    assert glob.glob(str(tmp_path / "runs" / "refused" / "dead_letter" / "*.parquet"))  # kept for triage
