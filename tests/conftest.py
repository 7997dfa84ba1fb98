"""Shared fixtures: tiny randomly initialized models built from configs, and the sample catalog.

No test downloads weights. The tiny models are architecture-true but a few
layers wide, so every stage runs for real in seconds, and their tokenizers
are tiny ones built from tests/data, so the default suite needs no packaged
weights. Real weights belong to tests marked ``real_weights``: a test without
the marker that loads a model with real weights fails (``_real_weights_guard``).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

# pytest loads this file as module ``conftest``; tests import it as ``tests.conftest``: one module object
# for both names, so the guard's and the helpers' state below is shared
sys.modules.setdefault("tests.conftest", sys.modules[__name__])

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
SAMPLE = ROOT / "sample_catalog"
TINY_CLIP_JSON = str(DATA / "tiny-clip.json")


def tiny_run_argv(catalog, out, run_id: str, text_dir: str, *extra: str, batch_size: int = 8,
                  command: bool = True) -> list[str]:
    """The argv of one pipeline run with tiny random models on every route: the options every run test shares.

    The tiny CLIP, the tiny sentence encoder ``text_dir`` and the tiny Whisper
    (transformers backend, random weights; ``--asr_model none`` in ``extra``
    turns speech off). The preset fills no other slot (``offline-v1`` has no
    sound or image model), so no real weights load. ``command``: start with
    ``run`` (for ``cli.main``); without it the list is pipeline options (for
    ``PipelineOptions``). ``extra`` options come last, so they override the
    shared ones.
    """
    return ((["run"] if command else [])
            + ["--catalog", str(catalog), "--output", str(out), "--run_id", run_id, "--preset", "offline-v1",
               "--clip_model", TINY_CLIP_JSON, "--clip_weights", "random", "--text_model", str(text_dir),
               "--asr_backend", "transformers", "--asr_model", tiny_whisper_path(), "--asr_weights", "random",
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


def _tokenizers_script():
    """tests/data/make_tiny_tokenizer.py as a module (tests/data is data, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny_tokenizer", DATA / "make_tiny_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_tokenizer(dest: Path) -> None:
    """The committed tiny WordPiece tokenizer (tests/data/tiny-wordpiece) for tiny BERT-vocabulary models."""
    for src in TINY_WORDPIECE.iterdir():
        shutil.copy(src, dest / src.name)


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


_TMP_ROOT: list[Path] = []  # this session's pytest temporary root, for helpers that are not fixtures


@pytest.fixture(scope="session", autouse=True)
def _session_tmp(tmp_path_factory):
    """Gives :func:`tiny_whisper_path` (called by tiny_run_argv, not a fixture) the session's temporary root."""
    _TMP_ROOT.append(tmp_path_factory.getbasetemp())
    yield
    _TMP_ROOT.clear()


def tiny_whisper_path() -> str:
    """The session's tiny Whisper directory, built on first use (see :func:`tiny_whisper_dir`)."""
    dest = _TMP_ROOT[0] / "tiny-whisper"
    if not (dest / "tokenizer.json").is_file():
        _build_tiny_whisper(dest)
    return str(dest)


@pytest.fixture(scope="session")
def tiny_whisper_dir(_session_tmp) -> str:
    """A 1-layer, 32-wide English-only Whisper config with a tiny Whisper tokenizer (random weights).

    The tokenizer (tests/data/make_tiny_tokenizer.py, built here) has synthetic
    text tokens but tiny.en's special-token ids, so prompts, suppression and
    decoding run as with the real one.
    """
    return tiny_whisper_path()


def _build_tiny_whisper(dest: Path) -> None:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperTokenizerFast

    dest.mkdir(exist_ok=True)
    WhisperConfig(vocab_size=51864, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                  max_source_positions=1500, max_target_positions=448, decoder_start_token_id=50257,
                  eos_token_id=50256, pad_token_id=50256, bos_token_id=50256).save_pretrained(dest)
    source = dest.parent / "tiny-whisper-tokenizer"
    source.mkdir(exist_ok=True)
    tokenizer_file = _tokenizers_script().write_whisper_tokenizer(source)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(dest)
    WhisperTokenizerFast(tokenizer_file=str(tokenizer_file)).save_pretrained(dest)  # last: marks it complete


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


# ---- the guard: real weights only in tests marked real_weights ----

def _model_paths(spec) -> list[str]:
    """The local paths a spec loads from (its name, a weights file; a bridge's text model's too)."""
    paths = [getattr(spec, "model", None) or getattr(spec, "name", ""), getattr(spec, "weights", "")]
    text = getattr(spec, "text", None)
    return [p for p in paths if p] + (_model_paths(text) if text is not None else [])


def real_weights_in(spec, tmp_root: Path) -> str | None:
    """Why loading ``spec`` loads real weights, or None when it builds random ones or reads a tiny model.

    Random weights (``weights_label`` random) are built from a config; a model
    saved under this session's temporary directory is one of the tiny fixtures
    (saved with random weights, loaded as ``pretrained``). Anything else is
    real: packaged weights, a hub id, a pretrained tag.
    """
    if spec.weights_label == "random" and getattr(spec, "text", None) is None:
        return None
    if spec.weights_label == "random":  # a bridge: its classifier is random, its text model may not be
        return real_weights_in(spec.text, tmp_root)
    where = [p for p in _model_paths(spec) if os.path.exists(p)]
    if where and all(Path(p).resolve().is_relative_to(tmp_root) for p in where):
        return None
    return f"{spec.family} {getattr(spec, 'model', None) or spec.name} (weights {spec.weights!r}) is real"


class RealWeightsWithoutMarker(RuntimeError):
    """A test not marked real_weights loaded a model with real weights."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Keeps the running test, so a load in a module- or session-scoped fixture is charged to it."""
    _GUARD["item"] = item
    yield
    _GUARD.pop("item", None)


_GUARD: dict = {}  # the running test item, and per test node id the real loads it made


@pytest.fixture(scope="session", autouse=True)
def _real_weights_guard(tmp_path_factory):
    """Makes a test not marked ``real_weights`` that loads a model with real weights fail.

    Every model load goes through ``encoders.families.load`` (the registry's
    one loader: the handlers, towers, ASR, ConSE and the query side call it),
    so the check wraps it, for the whole session: fixtures of any scope are
    charged to the test whose setup built them. It sees this process only:
    Beam workers in other processes (multi_processing, the portable runner's
    pool) load unchecked.
    """
    from encoders import families

    tmp_root = tmp_path_factory.getbasetemp().resolve()
    original = families.load

    def guarded(spec, device, precision="fp32"):
        item = _GUARD.get("item")
        reason = real_weights_in(spec, tmp_root)
        if reason is not None and item is not None and item.get_closest_marker("real_weights") is None:
            _GUARD.setdefault(item.nodeid, []).append(reason)
            raise RealWeightsWithoutMarker(f"{reason}: a test that loads real weights must be marked real_weights")
        return original(spec, device, precision)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(families, "load", guarded)
        yield


@pytest.fixture(autouse=True)
def _no_real_weights_loaded(request):
    """Fails the test, even where the error was caught on the way, when the guard stopped a real load."""
    yield
    loaded = _GUARD.pop(request.node.nodeid, None)
    if loaded:
        pytest.fail(f"loaded real weights without the real_weights marker: {loaded}", pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    """A pipeline built by a test (not through the command) leaves its progress reporter running: end it
    before pytest closes the streams it logs to."""
    from pipeline.stages import progress

    progress.stop()
