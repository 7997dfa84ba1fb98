"""Audio queries: decoded, transcribed and CLAP-encoded like an item's audio, fused in the run's layout."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline import cli
from pipeline.query.encoder import QueryContentError, QueryEncoder, load_run
from pipeline.query.search import ExactSearcher, open_searcher
from tests.conftest import tiny_run_argv

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "sample_catalog")
TRAIN = os.path.join(SAMPLE, "audio", "sku-0036.ogg")  # the audio-only item: a spoken description


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory, tiny_text_dir, tiny_whisper_dir, tiny_clap_dir):
    out = tmp_path_factory.mktemp("out")
    argv = tiny_run_argv(os.path.join(SAMPLE, "catalog.parquet"), out, "audio", tiny_text_dir,
                         "--asr_backend", "transformers", "--asr_model", tiny_whisper_dir, "--asr_weights", "random",
                         "--clap_model", tiny_clap_dir, "--clap_weights", "random")
    assert cli.main(argv) == 0
    return os.path.join(str(out), "runs", "audio")


def test_an_items_own_clip_encodes_to_its_stored_vector(audio_run):
    run = load_run(audio_run)
    assert {r.get("via") for r in run.metadata["routes"] if r["modality"] == "audio"} == {"transcript", "waveform"}
    exact = ExactSearcher.from_files(run.embedding_files)
    q = QueryEncoder(run).encode("audio", [TRAIN])
    # the audio-only item's vector was fused from this clip alone (mean mode: query and item agree)
    np.testing.assert_allclose(q[0], exact.vectors[exact.ids.index("sku-0036")], atol=1e-4)
    for searcher in (exact, open_searcher(run.run_dir, run.manifest, run.embedding_files)):
        scores, ids = searcher.search(q, 3)
        assert ids[0][0] == "sku-0036" and scores[0][0] == pytest.approx(1, abs=1e-4)


def test_search_and_eval_take_audio(audio_run, tmp_path, capsys):
    assert cli.main(["search", "--run", audio_run, "--audio", TRAIN, "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "audio query" in lines[0] and lines[1].split()[1] == "sku-0036"
    assert cli.main(["search", "--run", audio_run, "--audio", str(tmp_path / "nope.wav")]) == 2
    assert "audio query" in capsys.readouterr().err
    queries = tmp_path / "q.jsonl"
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really")
    queries.write_text("\n".join(json.dumps(q) for q in [
        {"modality": "audio", "query": os.path.abspath(TRAIN), "relevant": ["sku-0036"]},
        {"modality": "audio", "query": "bad.wav", "relevant": ["sku-0001"]},  # relative to the queries file
        {"modality": "text", "query": "espresso cup", "relevant": ["sku-0001"]},
    ]) + "\n")
    out = tmp_path / "report.json"
    assert cli.main(["eval", "--run", audio_run, "--queries", str(queries), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["by_modality"]["audio"]["queries"] == 2 and report["by_modality"]["audio"]["recall@1"] == 0.5
    assert report["failed"]["audio"][0]["line"] == 2 and "decode_failed" in report["failed"]["audio"][0]["reason"]
    bad = next(q for q in report["per_query"] if q["line"] == 2)
    assert bad["top"] == [] and bad["mrr"] == 0 and "error" in bad
    assert "could not be encoded (counted as misses)" in printed


def test_a_clip_without_speech_needs_clap(audio_run):
    """A run with speech recognition but no CLAP cannot embed a chime: a clear error, not a zero vector."""
    run = load_run(audio_run)
    encoder = QueryEncoder(run)
    # the same run's metadata without its clap route: what a text-only run with ASR looks like
    meta = dict(run.metadata, routes=[r for r in run.metadata["routes"] if r.get("via") != "waveform"])
    no_clap = QueryEncoder(type(run)(run.run_dir, run.manifest, meta, run.embedding_files))
    def silent(clips, batch_size):
        return [type("T", (), {"text": "", "is_speech": False, "no_speech_prob": 0.9})() for _ in clips]
    from encoders import asr

    recognizer = asr.load(run.asr_spec(), encoder.device)
    original = recognizer.transcribe
    recognizer.transcribe = silent
    try:
        with pytest.raises(QueryContentError, match="no recognizable speech .*0.90.*no CLAP space"):
            no_clap.encode("audio", [TRAIN])
        vectors, errors = no_clap.encode_each("audio", [TRAIN, TRAIN])
        assert set(errors) == {0, 1} and not vectors.any()
        # with CLAP the sound itself is still embedded: only the clap block is filled
        v = encoder.encode("audio", [TRAIN])[0]
        for block in run.layout.blocks:
            part = np.linalg.norm(v[block.offset: block.offset + block.dim])
            assert (part == pytest.approx(1, abs=1e-5)) if block.space == "clap" else part == 0
    finally:
        recognizer.transcribe = original
