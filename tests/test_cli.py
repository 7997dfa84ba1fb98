"""The ``catalog-index`` command as a new user meets it: columns, one-line errors, exit codes, quiet output,
search results a person can read."""
from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_catalog"
TINY_CLIP = str(Path(__file__).resolve().parent / "data" / "tiny-clip.json")
NOISE = ("Traceback", "apitools", "Loading weights", "No pretrained weights loaded", "initialized randomly",
         "WARNING")


def _models(text_dir: str) -> list[str]:
    return ["--clip_model", TINY_CLIP, "--clip_weights", "random", "--text_model", text_dir, "--asr_model", "none",
            "--clap_model", "none",
            "--device", "cpu", "--batch_size", "8"]


@pytest.fixture(scope="module")
def renamed_catalog(tmp_path_factory) -> Path:
    """The sample catalog with its image column named ``image_uri`` (the default is ``image_uris``)."""
    root = tmp_path_factory.mktemp("renamed")
    shutil.copytree(SAMPLE / "images", root / "images")
    table = pq.read_table(SAMPLE / "catalog.parquet")
    pq.write_table(table.rename_columns(["image_uri" if c == "image_uris" else c for c in table.column_names]),
                   root / "catalog.parquet")
    return root / "catalog.parquet"


@pytest.fixture(scope="module")
def quiet_run(renamed_catalog, tiny_text_dir, tmp_path_factory):
    """One run in a fresh process (so import-time warnings would show), over the renamed catalog."""
    out = tmp_path_factory.mktemp("out")
    argv = [sys.executable, "-m", "pipeline.cli", "run", "--catalog", str(renamed_catalog), "--output", str(out),
            "--run_id", "quiet", "--max_failure_fraction", "0.5", *_models(tiny_text_dir)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    return done, out / "runs" / "quiet"


def test_a_run_prints_no_third_party_noise_and_no_traceback(quiet_run):
    done, _ = quiet_run
    assert done.returncode == 0, done.stderr
    for noise in NOISE:
        assert noise not in done.stderr, f"{noise!r} on stderr:\n{done.stderr}"
    assert done.stdout.startswith("run quiet: 36 items read")


def test_a_default_column_missing_is_named_in_summary_manifest_and_report(quiet_run):
    done, run_dir = quiet_run
    message = "no column 'image_uris'; did you mean --image_column image_uri? (image not read)"
    assert f"  catalog: {message}" in done.stdout.splitlines()
    assert f"note: {message}" in done.stderr  # said before the work starts, too
    manifest = json.loads((run_dir / "manifest.json").read_text())
    (missing,) = manifest["catalog"]["missing_columns"]
    assert (missing["field"], missing["suggestion"], missing["modality"]) == ("image_uris", "image_uri", "image")
    assert html.escape(message) in (run_dir / "report.html").read_text()
    assert manifest["stats"]["modalities"].get("image", 0) == 0  # and indeed no image was read


def test_search_shows_titles_and_snippets(quiet_run, capsys):
    _, run_dir = quiet_run
    assert cli.main(["search", "--run", str(run_dir), "--text", "ceramic espresso cup", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("run quiet ") and len(lines) == 4
    titles = {row["item_id"]: row["title"] for row in pq.read_table(
        next((run_dir / "embeddings").glob("*.parquet")), columns=["item_id", "title"]).to_pylist()}
    for line in lines[1:]:
        rank, item_id, score, text = line.split(None, 3)
        assert score.startswith("score=") and text.startswith(titles[item_id])


def test_search_json(quiet_run, capsys):
    _, run_dir = quiet_run
    assert cli.main(["search", "--run", str(run_dir), "--text", "yoga mat", "-k", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["run_id"] == "quiet" and result["query"] == {"modality": "text", "content": "yoga mat"}
    assert [h["rank"] for h in result["hits"]] == [1, 2]
    assert all(h["title"] and h["snippet"] and isinstance(h["score"], float) for h in result["hits"])


def _expect_usage_error(capsys, argv: list[str], *fragments: str) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("note: ")]
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_an_explicit_column_the_catalog_lacks_stops_before_any_work(renamed_catalog, tiny_text_dir, tmp_path,
                                                                   capsys):
    _expect_usage_error(capsys, ["run", "--catalog", str(renamed_catalog), "--output", str(tmp_path),
                                 "--image_column", "image_url", *_models(tiny_text_dir)],
                        "--image_column 'image_url'", "did you mean --image_column image_uri?", "catalog columns:")
    assert not (tmp_path / "runs").exists()


def test_passthrough_and_content_columns(renamed_catalog, tiny_text_dir, tmp_path, capsys):
    base = ["run", "--output", str(tmp_path), *_models(tiny_text_dir)]
    _expect_usage_error(capsys, [*base, "--catalog", str(renamed_catalog), "--passthrough_columns", "prize"],
                        "--passthrough_columns 'prize'", "did you mean --passthrough_columns price?")
    no_content = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"item_id": ["a"], "price": [1.0]}), no_content)
    _expect_usage_error(capsys, [*base, "--catalog", str(no_content)], "none of the content columns")


@pytest.mark.parametrize("extra, fragment", [
    (["--batch_size", "abc"], "invalid int value: 'abc'"),
    (["--batch_size", "-3"], "batch_size must be in 1..4096"),
    (["--image_colum", "image_uri"], "unknown option --image_colum; did you mean --image_column?"),
    (["--fusion_mode", "median"], "invalid choice: 'median'"),
    (["--decode_processes", "many"], "--decode_processes: expected auto or a number, got 'many'"),
    (["--decode_processes", "-2"], "decode_processes must be auto or in 0..256"),
])
def test_bad_options_and_values(renamed_catalog, tiny_text_dir, tmp_path, capsys, extra, fragment):
    _expect_usage_error(capsys, ["run", "--catalog", str(renamed_catalog), "--output", str(tmp_path),
                                 *_models(tiny_text_dir), *extra], fragment)


def test_clip_config_file_without_weights_is_one_line(renamed_catalog, tmp_path, capsys):
    _expect_usage_error(capsys, ["run", "--catalog", str(renamed_catalog), "--output", str(tmp_path),
                                 "--clip_model", TINY_CLIP, "--text_model", "none"],
                        "open_clip weights must be a pretrained tag, a checkpoint path or 'random'")


def test_catalog_file_errors(tmp_path, tiny_text_dir, capsys):
    base = ["run", "--output", str(tmp_path), *_models(tiny_text_dir)]
    _expect_usage_error(capsys, [*base, "--catalog", str(tmp_path / "none" / "*.parquet")], "matches no file")
    (tmp_path / "notes.parquet").write_text("not parquet")
    _expect_usage_error(capsys, [*base, "--catalog", str(tmp_path / "notes.parquet")], "not a readable Parquet file")
    _expect_usage_error(capsys, ["run", "--output", str(tmp_path)], "--catalog is required")


def test_unreadable_query_media_and_query_files(quiet_run, tmp_path, capsys):
    _, run_dir = quiet_run
    _expect_usage_error(capsys, ["search", "--run", str(run_dir), "--image", str(tmp_path / "no.jpg")],
                        "does not exist")
    _expect_usage_error(capsys, ["search", "--run", str(run_dir), "--image", str(ROOT / "README.md")],
                        "not an image format")
    _expect_usage_error(capsys, ["eval", "--run", str(run_dir), "--queries", str(tmp_path / "no.jsonl")],
                        "No such file")
    (tmp_path / "bad.jsonl").write_text('{"modality": "text"\n')
    _expect_usage_error(capsys, ["eval", "--run", str(run_dir), "--queries", str(tmp_path / "bad.jsonl")],
                        "not JSON")
    _expect_usage_error(capsys, ["search", "--run", str(tmp_path), "--text", "x"], "neither manifest.json")


def test_missing_cuda_is_one_line_not_a_traceback(renamed_catalog, tiny_text_dir, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    models = _models(tiny_text_dir)
    models[models.index("--device") + 1] = "cuda"
    _expect_usage_error(capsys, ["run", "--catalog", str(renamed_catalog), "--output", str(tmp_path),
                                 "--index", "off", *models], "requested but torch sees no CUDA device")


def test_an_unexpected_error_keeps_its_traceback(renamed_catalog, tiny_text_dir, tmp_path, monkeypatch):
    import pipeline.graph

    def broken(p, config, **_):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pipeline.graph, "build", broken)
    with pytest.raises(RuntimeError, match="a bug"):  # main does not swallow it: Python prints it, exit status 1
        cli.main(["run", "--catalog", str(renamed_catalog), "--output", str(tmp_path), *_models(tiny_text_dir)])


def test_beam_and_dataflow_flags_pass_the_typo_check(capsys):
    from pipeline.cli import _check_flags

    _check_flags(["--catalog", "x", "--runner=DataflowRunner", "--worker_machine_type=g2-standard-24",
                  "--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:1", "--experiments=use_runner_v2",
                  "--sdk_container_image=img:1", "--setup_file", "./setup.py", "--direct_running_mode=multi_processing",
                  "--job_endpoint=embed", "--environment_type=LOOPBACK", "--model_copies_per_gpu=1", "--verbose"])
    assert capsys.readouterr().err == ""
    _check_flags(["--catalog", "x", "--some_service_flag=1"])  # unknown but not a typo: named, passed on
    assert "--some_service_flag is neither" in capsys.readouterr().err


@pytest.mark.parametrize("flags,direct", [
    ([], True), (["--runner=DirectRunner"], True), (["--runner", "direct"], True),
    (["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"], True),
    (["--runner=BundleBasedDirectRunner"], False), (["--runner=PortableRunner"], False),
    (["--runner=DataflowRunner"], False),
])
def test_the_direct_runner_runs_on_the_fn_api_runner_without_its_prism_attempt(flags, direct):
    """DirectRunner (or none) -> Beam's FnApiRunner in this process, options carried as DirectRunner does."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    runner = cli.local_runner(PipelineOptions(flags))
    assert isinstance(runner, fn_runner.FnApiRunner) == direct and (runner is None) == (not direct)
    if direct:
        carried = runner._provision_info.provision_info.pipeline_options
        for flag in flags:
            if flag.startswith("--direct_"):
                name, value = flag[2:].split("=")
                assert str(carried["beam:option:" + name + ":v1"]) == value
