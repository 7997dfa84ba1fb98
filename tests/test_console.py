"""The command line's plain parts: logging, one-line errors, the progress bar, summary and hit display."""
from __future__ import annotations

import io
import logging

import pytest

from pipeline import console
from pipeline.console import Parser, UsageError
from pipeline.progress_bar import TerminalBar, render
from schemas.embeddings import display_fields
from schemas.manifest import IncrementalCounts, Manifest


def test_quiet_logging_drops_third_party_records_and_keeps_ours():
    stream = io.StringIO()
    console.configure_logging(stream=stream)
    logging.getLogger().warning("apitools not found")  # how Beam and open_clip log
    logging.getLogger("transformers.modeling_utils").warning("Loading weights")
    logging.getLogger("catalog_index.progress").info("progress after 10s")
    logging.getLogger("pipeline.stages.index").info("index: exact flat index")
    text = stream.getvalue()
    assert "apitools" not in text and "Loading weights" not in text
    assert "progress after 10s" in text and "exact flat index" in text


@pytest.mark.parametrize("flags", [["--verbose"], ["--log_level", "WARNING"]])
def test_verbose_or_log_level_brings_third_party_back(flags):
    rest, verbose, level = console.pop_verbosity(["--catalog", "x", *flags])
    assert rest == ["--catalog", "x"]
    stream = io.StringIO()
    console.configure_logging(verbose, level, stream=stream)
    logging.getLogger().warning("apitools not found")
    assert "apitools not found" in stream.getvalue()
    console.configure_logging()  # back to quiet for the other tests


def test_parser_errors_are_one_line_with_a_hint():
    parser = Parser(prog="catalog-index run")
    parser.add_argument("--batch_size", type=int)
    with pytest.raises(UsageError) as e:
        parser.parse_args(["--batch_size", "abc"])
    err = io.StringIO()
    assert console.report(e.value, err) == console.EXIT_USAGE
    lines = err.getvalue().splitlines()
    assert lines == ["error: argument --batch_size: invalid int value: 'abc'",
                     "hint: catalog-index run --help lists the options"]


def test_typos_of_known_flags_are_told_apart_from_runner_flags():
    typos, others = console.unknown_flags(["--image_colum", "x", "--dataflow_kms", "y"], ["--image_column", "--runner"])
    assert typos == ["--image_colum"] and others == ["--dataflow_kms"]


def test_publish_refusal_is_found_in_a_runner_wrapped_message():
    from pipeline.cli import publish_refusal

    wrapped = RuntimeError("Pipeline failed: FailureThresholdError: 4 of 36 input rows failed "
                           "[while running 'Publish/Publish']\nmore")
    assert publish_refusal(wrapped) == "FailureThresholdError: 4 of 36 input rows failed"
    assert publish_refusal(RuntimeError("something else")) is None


@pytest.mark.parametrize("done, total, elapsed, expected", [
    (0, 100, 1.0, "[....................] 0/100 items  0.0 items/s  ETA --  (1s)"),
    (25, 100, 5.0, "[#####...............] 25/100 items  5.0 items/s  ETA 15s  (5s)"),
    (100, 100, 80.0, "[####################] 100/100 items  1.2 items/s  done  (1m20s)"),
    (5000, 7200 * 2, 3600.0, "[######..............] 5000/14400 items  1.4 items/s  ETA 1h52m  (1h00m)"),
    (7, None, 2.0, "7 items  3.5 items/s  (2s)"),
])
def test_progress_bar_line(done, total, elapsed, expected):
    assert render(done, total, elapsed, width=20) == expected


def test_terminal_bar_draws_in_place_and_keeps_log_lines_above():
    stream = io.StringIO()
    counts = iter(range(100))
    with TerminalBar(10, lambda: min(next(counts), 10), stream, interval_s=0.01) as bar:
        bar.log_stream().write("09:00:00 pipeline.stages.index a log line\n")
    text = stream.getvalue()
    assert "\r\x1b[K09:00:00 pipeline.stages.index a log line\n" in text
    assert text.rstrip("\n").split("\r")[-1].startswith("[") and text.endswith("\n")


def test_display_fields_title_and_snippet():
    shown = display_fields("  Red   mug ", "A glazed\nceramic mug. " * 30, "spoken words")
    assert shown["title"] == "Red mug"
    assert len(shown["snippet"]) <= 120 and shown["snippet"].endswith("…") and "\n" not in shown["snippet"]
    assert display_fields(None, None, "a spoken description") == {"title": None,
                                                                    "snippet": "(audio) “a spoken description”"}
    assert display_fields("t", None, "") == {"title": "t", "snippet": None}


def test_summary_counts_read_consistently():
    from pipeline.cli import _incremental_line

    line = _incremental_line(IncrementalCounts.from_dict(
        {"reused": 0, "encoded": 13, "new": 34, "changed": 0, "deleted": 0, "previous_run": None}))
    assert line == ("  incremental: 0 reused + 13 encoded; 34 sent to the encoders (34 new, 0 changed), "
                    "21 of them failed; 0 deleted; previous run: none")


def test_report_names_missing_columns():
    from pipeline.report.render import catalog_html

    manifest = {"catalog": {"path": "/c/*.parquet", "missing_columns": [
        {"message": "no column 'image_uris'; did you mean --image_column image_uri? (image not read)"}]}}
    page = catalog_html(Manifest.from_dict(manifest))
    assert "/c/*.parquet" in page and "did you mean --image_column image_uri?" in page
    assert "catalog <code>old.parquet</code>" in catalog_html(Manifest.from_dict({"catalog": "old.parquet"}))  # older manifests


def test_worker_lines_relayed_by_beam_pass_only_when_they_are_ours():
    def entry(location: str, message: str) -> logging.LogRecord:
        text = f'severity: INFO\nmessage: "{message}"\nlog_location: "{location}"\nthread: "1"\n'
        return logging.LogRecord("root", logging.INFO, "worker_handlers.py", 1, text, (), None)

    ours = entry("/src/pipeline/progress.py:33", "progress after 10s: read 36 (3.6/s) \\346\\241\\221")
    assert console.relayed_own_line(ours) == "progress after 10s: read 36 (3.6/s) 桑"
    assert console.relayed_own_line(entry("/site-packages/apache_beam/runners/worker/sdk_worker.py:9", "x")) is None
    stream = io.StringIO()
    console.configure_logging(stream=stream)
    logging.getLogger().handle(ours)
    logging.getLogger().handle(entry("/site-packages/apache_beam/io/gcp/bigquery.py:1", "apitools not found"))
    assert "progress after 10s" in stream.getvalue() and "apitools" not in stream.getvalue()


def test_worker_processes_get_quiet_log_flags_unless_asked_otherwise():
    flags = console.worker_log_flags(["--catalog", "x"], False, None)
    assert flags[0] == "--default_sdk_harness_log_level=ERROR" and '"pipeline": "INFO"' in flags[1]
    assert console.worker_log_flags(["--default_sdk_harness_log_level=DEBUG"], False, None)[0].startswith(
        "--sdk_harness_log_level_overrides=")
    assert console.worker_log_flags([], True, None) == []
    assert console.worker_log_flags([], False, "DEBUG") == ["--default_sdk_harness_log_level=DEBUG"]
