"""Fault tolerance: retried bundles leave no duplicates, a killed or failed run leaves LATEST alone.

Faults are injected through the test hook in pipeline/stages/faults.py. Beam's
in-memory runner (FnApiRunner) fails the job on the first exception, so the
retry tests use Beam's ``BundleBasedDirectRunner``, which retries a failed
bundle up to four times and discards the failed attempt's outputs, the way
Dataflow does. What our code must add is that a retried attempt's side
effects (shard files, manifest, LATEST) are idempotent.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli

from pipeline.stages import faults
from pipeline.stages.write import write_table_atomically
from schemas.embeddings import vectors_of
from tests.conftest import tiny_run_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _argv(catalog, out, run_id, text_dir, *extra):
    return tiny_run_argv(catalog, out, run_id, text_dir, *extra)


def _embeddings(out, run_id) -> pa.Table:
    files = sorted(glob.glob(os.path.join(str(out), "runs", run_id, "embeddings", "*.parquet")))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("item_id")


def _manifest(out, run_id) -> dict:
    with open(os.path.join(str(out), "runs", run_id, "manifest.json")) as f:
        return json.load(f)


@pytest.fixture()
def fault(monkeypatch, tmp_path):
    """fault(point, action) arms the hook; returns the marker path that proves it fired."""
    def arm(point: str, action: str = "raise_once") -> str:
        marker = str(tmp_path / f"fault-{point}.marker")
        monkeypatch.setenv(faults.ENV, f"{point}:{action}:{marker}")
        return marker
    return arm


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, sample_catalog, tiny_text_dir):
    """A clean in-memory run: the reference, and the 'previous good run' that LATEST points to."""
    out = tmp_path_factory.mktemp("faults-out")
    assert cli.main(_argv(sample_catalog, out, "good", tiny_text_dir)) == 0
    return out, _embeddings(out, "good")


def test_hook_is_inert_unless_armed(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.inject("write_shard")


def test_hook_fires_once(fault):
    marker = fault("write_shard")
    with pytest.raises(faults.InjectedFault):
        faults.inject("write_shard")
    faults.inject("write_shard")  # the retry goes through
    faults.inject("fuse")  # other points are untouched
    assert os.path.exists(marker)


def test_failed_shard_write_leaves_no_partial_file(fault, tmp_path):
    fault("write_shard")
    table = pa.table({"item_id": ["a", "b"]})
    path = str(tmp_path / "part-00000-of-00001.parquet")
    with pytest.raises(faults.InjectedFault):
        write_table_atomically(path, table)
    assert os.listdir(tmp_path) == ["fault-write_shard.marker"]  # neither the shard nor a temporary
    write_table_atomically(path, table)
    write_table_atomically(path, table)  # a retry rewrites the same file with the same rows
    assert pq.read_table(path).equals(table)


@pytest.mark.parametrize("point", ["fuse", "write_shard", "publish_latest"])
def test_retried_bundle_gives_no_duplicates(point, fault, good_run, sample_catalog, tiny_text_dir, tmp_path):
    _, reference = good_run
    marker = fault(point)
    assert cli.main(_argv(sample_catalog, tmp_path, "retried", tiny_text_dir, "--runner=BundleBasedDirectRunner",
                          "--num_shards", "2")) == 0
    assert os.path.exists(marker), "the fault never fired"
    table = _embeddings(tmp_path, "retried")
    ids = table.column("item_id").to_pylist()
    assert len(ids) == len(set(ids)) == reference.num_rows
    assert ids == reference.column("item_id").to_pylist()
    assert np.array_equal(vectors_of(table), vectors_of(reference))  # same vectors as the clean run
    assert _manifest(tmp_path, "retried")["counts"]["embedded"] == reference.num_rows
    assert not glob.glob(str(tmp_path / "runs" / "retried" / "**" / ".tmp-*"), recursive=True)
    assert (tmp_path / "LATEST").read_text().strip() == "retried"


def test_failure_before_latest_keeps_the_previous_run(fault, good_run, sample_catalog, tiny_text_dir):
    out, _ = good_run
    fault("publish_latest")
    with pytest.raises(Exception, match="injected fault"):
        cli.main(_argv(sample_catalog, out, "dies-before-latest", tiny_text_dir))
    assert (out / "LATEST").read_text().strip() == "good"


def test_rerun_after_a_crash_reuses_what_the_crashed_attempt_wrote(fault, good_run, sample_catalog, tiny_text_dir,
                                                                  tmp_path):
    """Issue 11: a run that dies midway, rerun with the same --run_id, encodes only what it had not written."""
    _, reference = good_run
    fault("fuse")  # the in-memory runner fails the job after the first batch of 8 items is written
    argv = _argv(sample_catalog, tmp_path, "crashy", tiny_text_dir, "--items_per_batch", "8")
    with pytest.raises(Exception, match="injected fault"):
        cli.main(argv)
    pieces = glob.glob(str(tmp_path / "runs" / "crashy" / "embeddings" / ".pieces" / "*.arrow"))
    assert pieces and not (tmp_path / "LATEST").exists()
    assert cli.main(argv) == 0  # the marker exists: the hook lets the rerun through
    table = _embeddings(tmp_path, "crashy")
    assert table.column("item_id").to_pylist() == reference.column("item_id").to_pylist()
    assert np.array_equal(vectors_of(table), vectors_of(reference))
    assert table.column("content_hash").to_pylist() == reference.column("content_hash").to_pylist()
    inc = _manifest(tmp_path, "crashy")["counts"]["incremental"]
    assert inc["resumed"] >= 8 and inc["encoded"] < reference.num_rows
    assert inc["resumed"] + inc["encoded"] == reference.num_rows and inc["new"] == reference.num_rows
    assert not (tmp_path / "runs" / "crashy" / "embeddings" / ".pieces").exists()  # cleaned once published


@pytest.mark.slow  # a fresh interpreter: about 20 s of imports and model building
def test_process_killed_mid_write_keeps_the_previous_run(good_run, sample_catalog, tiny_text_dir, tmp_path):
    out, _ = good_run
    marker = str(tmp_path / "killed.marker")
    env = dict(os.environ, **{faults.ENV: f"write_shard:exit:{marker}"})
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *_argv(sample_catalog, out, "killed", tiny_text_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert os.path.exists(marker)
    assert (out / "LATEST").read_text().strip() == "good"
    assert not os.path.exists(out / "runs" / "killed" / "manifest.json")
    assert os.path.exists(out / "runs" / "good" / "manifest.json")
