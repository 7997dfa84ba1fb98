"""Command-line options as a Beam ``PipelineOptions`` subclass, and their translation to a RunConfig."""
from __future__ import annotations

import argparse

from apache_beam.options.pipeline_options import PipelineOptions

from encoders import presets
from encoders.fusion import FusionConfig
from encoders.media import FetchPolicy
from encoders.specs import PRETRAINED, ModelSpec
from pipeline.config import MEDIA_ERROR_POLICIES, EncodeConfig, ReadConfig, RunConfig, WriteConfig
from pipeline.incremental import CHANGE_DETECTION, LATEST, IncrementalConfig
from schemas.catalog import CatalogColumns

NONE = "none"


def _weights(text: str) -> tuple[tuple[str, float], ...]:
    """``"text=1,image=0.5"`` -> (("text", 1.0), ("image", 0.5))."""
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected name=weight, got {part!r}")
        try:
            pairs.append((name.strip(), float(value)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {name!r} is not a number: {value!r}") from None
    return tuple(pairs)


class CatalogIndexOptions(PipelineOptions):
    """Options of ``catalog-index run``; every other flag goes to Beam (runner, workers...)."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("input and output")
        g.add_argument("--catalog", help="catalog Parquet path or glob (local, gs://, s3://...)")
        g.add_argument("--output", default="./out", help="output root; the run goes to OUTPUT/runs/<run_id>/")
        g.add_argument("--run_id", default="", help="run id (default: UTC time + random suffix)")
        g.add_argument("--num_shards", type=int, default=0, help="embeddings shards (0: from --rows_per_shard)")
        g.add_argument("--rows_per_shard", type=int, default=200_000)
        g.add_argument("--vector_dtype", default="float32", choices=["float32", "float16"])

        g = parser.add_argument_group("catalog columns")
        g.add_argument("--item_id_column", default="item_id")
        g.add_argument("--title_column", default="title")
        g.add_argument("--description_column", default="description")
        g.add_argument("--image_column", default="image_uris", help="one URI or a list of URIs per row")
        g.add_argument("--audio_column", default="audio_uri")
        g.add_argument("--passthrough_columns", default="", help="comma-separated columns copied to `attributes`")
        g.add_argument("--max_text_chars", type=int, default=10_000)

        g = parser.add_argument_group("models")
        g.add_argument("--preset", default="auto", help="auto | default | offline (see README)")
        g.add_argument("--clip_family", default=None, choices=["open_clip", "hf_clip"])
        g.add_argument("--clip_model", default=None, help="open_clip model name, or hf_clip hub id / dir; 'none' disables")
        g.add_argument("--clip_weights", default=None, help="open_clip: tag, checkpoint path or 'random'; hf: pretrained|random")
        g.add_argument("--text_model", default=None, help="sentence encoder hub id or dir; 'none' disables")
        g.add_argument("--text_weights", default=None, choices=["pretrained", "random"])
        g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (CUDA absent is an error)")
        g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast on CUDA")
        g.add_argument("--batch_size", type=int, default=32, help="rows per forward pass")

        g = parser.add_argument_group("media")
        g.add_argument("--max_media_bytes", type=int, default=FetchPolicy.max_bytes)
        g.add_argument("--fetch_timeout_s", type=float, default=FetchPolicy.timeout_s)
        g.add_argument("--max_image_pixels", type=int, default=FetchPolicy.max_image_pixels)
        g.add_argument("--allow_http", action="store_true", help="allow http(s) media URIs")
        g.add_argument("--media_errors", default="fail_item", choices=list(MEDIA_ERROR_POLICIES),
                       help="fail_item: an item with broken media is dead-lettered; drop_media: embed what is left")

        g = parser.add_argument_group("fusion")
        g.add_argument("--modality_weights", type=_weights, default=(), help="e.g. text=1,image=1")
        g.add_argument("--space_weights", type=_weights, default=(), help="e.g. clip=1,text=1")

        g = parser.add_argument_group("incremental runs")
        g.add_argument("--previous_run", default=LATEST,
                       help="reuse vectors of unchanged items from this run: 'latest' (the run OUTPUT/LATEST "
                            "points to), a run directory, or 'none' (encode everything)")
        g.add_argument("--change_detection", default="bytes", choices=list(CHANGE_DETECTION),
                       help="media change token: bytes (sha256, exact) or metadata (size + mtime, reads no bytes)")
        g.add_argument("--keep_runs", type=int, default=5,
                       help="published runs kept after this one is published (0 keeps all)")

        g = parser.add_argument_group("progress")
        g.add_argument("--progress_interval_s", type=float, default=10.0, help="0 disables progress lines")


def _space_spec(preset_spec: ModelSpec | None, family: str | None, model: str | None, weights: str | None,
                default_family: str) -> ModelSpec | None:
    """The preset's model for a space, with whatever the flags override."""
    if model == NONE:
        return None
    if model is None:
        if family is None and weights is None:
            return preset_spec
        if preset_spec is None:
            raise ValueError("model weights or family given for a space whose model is 'none'")
        return ModelSpec(family or preset_spec.family, preset_spec.name, weights or preset_spec.weights)
    family = family or default_family
    # open_clip has no implicit weights: its ModelSpec asks for a tag, a path or 'random'
    return ModelSpec(family, model, weights or PRETRAINED)


def to_run_config(opts: CatalogIndexOptions) -> tuple[RunConfig, str | None]:
    """Options -> RunConfig, and the preset fallback note (if ``auto`` had to fall back)."""
    o = opts.view_as(CatalogIndexOptions)
    preset, note = presets.resolve(o.preset)
    clip = _space_spec(preset.clip, o.clip_family, o.clip_model, o.clip_weights, "open_clip")
    text = _space_spec(preset.text, None, o.text_model, o.text_weights, "hf_text")
    columns = CatalogColumns(
        item_id=o.item_id_column, title=o.title_column, description=o.description_column,
        image_uris=o.image_column, audio_uri=o.audio_column,
        passthrough=tuple(c.strip() for c in o.passthrough_columns.split(",") if c.strip()),
    )
    fusion_kwargs = {}
    if o.modality_weights:
        fusion_kwargs["modality_weights"] = tuple({**dict(FusionConfig().modality_weights), **dict(o.modality_weights)}.items())
    if o.space_weights:
        fusion_kwargs["space_weights"] = o.space_weights
    config = RunConfig(
        read=ReadConfig(catalog=o.catalog or "", columns=columns, max_text_chars=o.max_text_chars),
        encode=EncodeConfig(clip=clip, text=text, device=o.device, precision=o.precision, batch_size=o.batch_size),
        write=WriteConfig(output=o.output, run_id=o.run_id, num_shards=o.num_shards,
                          rows_per_shard=o.rows_per_shard, vector_dtype=o.vector_dtype),
        fetch=FetchPolicy(max_bytes=o.max_media_bytes, timeout_s=o.fetch_timeout_s,
                          allow_http=o.allow_http, max_image_pixels=o.max_image_pixels),
        fusion=FusionConfig(**fusion_kwargs),
        media_errors=o.media_errors,
        progress_interval_s=o.progress_interval_s,
        incremental=IncrementalConfig(previous_run=o.previous_run, change_detection=o.change_detection,
                                      keep_runs=o.keep_runs),
        preset=preset.name if (clip, text) == (preset.clip, preset.text) else f"{preset.name}+overrides",
    )
    return config, note
