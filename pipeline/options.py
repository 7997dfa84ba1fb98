"""Command-line options as a Beam ``PipelineOptions`` subclass, and their translation to a RunConfig."""
from __future__ import annotations

import argparse
import dataclasses
import os

from apache_beam.options.pipeline_options import PipelineOptions

from encoders import presets
from encoders.asr import BACKENDS, COMPUTE_TYPES, AsrSpec, default_backend
from encoders.audio import AudioPolicy
from encoders.fusion import FUSION_MODES, FusionConfig
from encoders.media import DEFAULT_SCHEMES, FetchPolicy
from encoders.specs import PRETRAINED, ModelSpec
from pipeline.config import (DEFAULT_MAX_FAILURE_FRACTION, INDEX_METRICS, MEDIA_ERROR_POLICIES, EncodeConfig,
                             REUSE_QUANTIZER, IndexConfig, ReadConfig, RunConfig, WriteConfig, catalog_root)
from pipeline.config import CHANGE_DETECTION, LATEST, IncrementalConfig
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


def _local_abspath(path: str) -> str:
    # workers may run elsewhere than the launching shell's folder: pin local roots now
    return os.path.abspath(path) if path and "://" not in path else path


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


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
        g.add_argument("--image_model", default=None,
                       help="timm ImageNet classifier for an image space of its own (e.g. tf_efficientnet_lite0); "
                            "'none' disables")
        g.add_argument("--image_weights", default=None, help="its state-dict file, or 'random'")
        g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (CUDA absent is an error)")
        g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast on CUDA")
        g.add_argument("--batch_size", type=int, default=32, help="rows per forward pass; 0: from free GPU memory")

        g = parser.add_argument_group("scale-out (GPU workers)")
        g.add_argument("--model_copies_per_gpu", type=int, default=0,
                       help="0: each worker process loads its own copy on its own GPU; N: N copies per GPU shared "
                            "by all processes of a machine (Beam's shared model servers)")
        g.add_argument("--image_decode", default="cpu", choices=["cpu", "gpu"],
                       help="cpu: PIL on fetch threads; gpu: nvJPEG batches on the model's GPU, PIL fallback per item")
        g.add_argument("--decode_threads", type=int, default=8, help="fetch+decode threads per worker process")
        g.add_argument("--torch_threads", type=int, default=0,
                       help="torch intra-op threads per worker process on a CPU device (0: torch's default, one per "
                            "core); 1 suits a small model on a shared machine, where idle threads spin; no effect "
                            "on GPU workers")
        g.add_argument("--items_per_batch", type=int, default=256,
                       help="catalog items per element from the join to the write; each batch is fetched, decoded, "
                            "encoded (in --batch_size sub-batches) and fused inside one worker")

        g = parser.add_argument_group("audio")
        g.add_argument("--asr_backend", default="auto", choices=["auto", *BACKENDS],
                       help="speech recognition: auto = transformers on CUDA, faster_whisper on CPU")
        g.add_argument("--asr_model", default=None,
                       help="Whisper model dir / hub id / faster-whisper size; 'none' disables speech recognition")
        g.add_argument("--asr_weights", default=None, choices=["pretrained", "random"])
        g.add_argument("--asr_language", default="auto", help="auto (detect per clip) or a code such as en, zh")
        g.add_argument("--asr_compute_type", default="default", choices=list(COMPUTE_TYPES),
                       help="faster_whisper quantization (default: int8 on CPU, float16 on CUDA)")
        g.add_argument("--asr_beam_size", type=int, default=1)
        g.add_argument("--clap_model", default=None, help="CLAP model (hf_clap) hub id or dir; 'none' disables "
                       "the sound space (the offline preset's aisfx too)")
        g.add_argument("--clap_weights", default=None, choices=["pretrained", "random"])
        g.add_argument("--max_audio_seconds", type=float, default=AudioPolicy.max_seconds,
                       help="longer clips are dead-lettered (audio_too_long)")
        g.add_argument("--silence_dbfs", type=float, default=AudioPolicy.silence_dbfs,
                       help="clips whose RMS level stays below this are dead-lettered (silent_audio)")

        g = parser.add_argument_group("media")
        g.add_argument("--max_media_bytes", type=int, default=FetchPolicy.max_bytes)
        g.add_argument("--fetch_timeout_s", type=float, default=FetchPolicy.timeout_s)
        g.add_argument("--max_image_pixels", type=int, default=FetchPolicy.max_image_pixels)
        g.add_argument("--allow_http", action="store_true", help="allow http(s) media URIs")
        g.add_argument("--allowed_media_schemes", default=",".join(DEFAULT_SCHEMES),
                       help="comma-separated schemes read through Beam filesystems ('file' = local paths)")
        g.add_argument("--allowed_media_roots", default="",
                       help="comma-separated roots that media must lie under (local folders, gs://bucket/prefix); "
                            "default: the catalog's own folder tree")
        g.add_argument("--allowed_hosts", default="",
                       help="comma-separated http(s) hosts (.example.com: its subdomains); default: any public host")
        g.add_argument("--allow_private_hosts", action="store_true",
                       help="allow http(s) to loopback, private and link-local addresses (never metadata endpoints)")
        g.add_argument("--media_errors", default="fail_item", choices=list(MEDIA_ERROR_POLICIES),
                       help="fail_item: an item with broken media is dead-lettered; drop_media: embed what is left")

        g = parser.add_argument_group("reliability")
        g.add_argument("--max_failure_fraction", type=float, default=DEFAULT_MAX_FAILURE_FRACTION,
                       help="publish nothing and exit non-zero if more than this fraction of input rows "
                            "are dead-lettered")

        g = parser.add_argument_group("fusion")
        g.add_argument("--modality_weights", type=_weights, default=(), help="e.g. text=1,image=1")
        g.add_argument("--space_weights", type=_weights, default=(), help="e.g. clip=1,text=1")
        g.add_argument("--fusion_mode", default="mean", choices=list(FUSION_MODES),
                       help="mean: weighted average per space; concat: one block per (space, modality); "
                            "attention: per-item weights (agreement rule, or --fusion_module)")
        g.add_argument("--fusion_module", default="",
                       help="attention module saved by `catalog-index fit-fusion` (safetensors); needs "
                            "--fusion_mode attention")

        g = parser.add_argument_group("index (FAISS; chosen by measured recall within the memory budget unless given)")
        g.add_argument("--index", default="on", choices=["on", "off"], help="build index shards after embedding")
        g.add_argument("--index_factory", default="", help="faiss factory string, e.g. OPQ32,IVF1024,PQ32x8")
        g.add_argument("--index_nlist", type=int, default=0, help="IVF lists (0: automatic)")
        g.add_argument("--index_m", type=int, default=0, help="PQ sub-quantizers (0: from the memory budget)")
        g.add_argument("--index_nbits", type=int, default=0, help="bits per PQ code (0: automatic)")
        g.add_argument("--index_opq", action="store_true", help="add an OPQ rotation before IVF-PQ")
        g.add_argument("--index_metric", default="ip", choices=list(INDEX_METRICS), help="inner product or L2")
        g.add_argument("--index_memory_gb", type=float, default=IndexConfig.memory_gb,
                       help="memory budget of the whole index")
        g.add_argument("--index_train_size", type=int, default=IndexConfig.train_size, help="vectors to train on")
        g.add_argument("--index_queries", type=int, default=IndexConfig.num_queries,
                       help="held-out queries of the recall self-check")
        g.add_argument("--target_recall", type=float, default=IndexConfig.target_recall,
                       help="10-recall@10 the chosen index must reach at its recommended search setting")
        g.add_argument("--max_query_ms", type=float, default=IndexConfig.max_query_ms,
                       help="batched ms per query the recommended search setting may cost")
        g.add_argument("--recall_queries", default="",
                       help="JSON-lines queries in eval's format (modality, query, relevant), encoded with the "
                            "run's models: the recall self-check and the index choice also measure them")
        g.add_argument("--merge_index", action="store_true", help="also write index/merged.faiss")
        g.add_argument("--index_shard_vectors", type=int, default=IndexConfig.shard_vectors,
                       help="vectors per index shard: embeddings files are grouped into ceil(N / this) index "
                            "shards (at most one per file), each holding the trained quantizer once")
        g.add_argument("--reuse_quantizer", default=IndexConfig.reuse_quantizer, choices=list(REUSE_QUANTIZER),
                       help="auto: reuse the previous run's trained IVF-PQ when the model is unchanged and the "
                            "held-out quantization error has not drifted; never: always train")
        g.add_argument("--quantizer_drift_tolerance", type=float, default=IndexConfig.quantizer_drift_tolerance,
                       help="reuse while the error is at most (1 + this) x the error at training time")

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


# option dest -> CatalogColumns field, to know which columns were named on the command line
_COLUMN_OPTIONS = {"item_id_column": "item_id", "title_column": "title", "description_column": "description",
                   "image_column": "image_uris", "audio_column": "audio_uri", "passthrough_columns": "passthrough"}


def given_column_fields(argv: list[str]) -> frozenset[str]:
    """The catalog fields whose column option appears in ``argv`` (named, not left at the default).

    A named column the catalog lacks is an error; a default one may be absent
    (schemas.catalog.resolve_columns).
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    CatalogIndexOptions._add_argparse_args(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given, _ = parser.parse_known_args(argv)
    return frozenset(field for dest, field in _COLUMN_OPTIONS.items() if dest in vars(given))


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
        return dataclasses.replace(preset_spec, family=family or preset_spec.family,
                                   weights=weights or preset_spec.weights)
    family = family or default_family
    if family == "timm_image" and weights is None:
        from encoders.efficientnet import PACKAGED_ARCH, packaged_efficientnet

        weights = packaged_efficientnet() if model == PACKAGED_ARCH else None
        if weights is None:
            raise ValueError(f"--image_model {model} needs --image_weights (a state-dict file or 'random')")
    # open_clip has no implicit weights: its ModelSpec asks for a tag, a path or 'random'
    return ModelSpec(family, model, weights or PRETRAINED)


def _asr_spec(preset: presets.Preset, o, device: str) -> AsrSpec | None:
    """The preset's recognizer for the backend in use, with whatever the flags override."""
    if o.asr_model == NONE:
        return None
    if o.asr_backend != "auto":
        backend = o.asr_backend
    elif device.startswith("cuda"):
        backend = "transformers"  # the workers' GPUs; the launcher itself may have none
    else:
        from encoders.device import resolve_device

        # "auto" is decided at launch: pass --device cuda when workers have GPUs but the launcher has none
        backend = default_backend(resolve_device(device))
    language = None if o.asr_language in ("", "auto") else o.asr_language
    settings = dict(language=language, compute_type=o.asr_compute_type, beam_size=o.asr_beam_size)
    if o.asr_model is None:
        base = preset.asr_for(backend)
        if base is None:
            return None
        if o.asr_backend != "auto" and base.backend != o.asr_backend:
            raise ValueError(f"preset {preset.name!r} has no {o.asr_backend} recognizer; give --asr_model")
        return AsrSpec(base.backend, base.model, o.asr_weights or base.weights, **settings)
    return AsrSpec(backend, o.asr_model, o.asr_weights or PRETRAINED, **settings)


def to_run_config(opts: CatalogIndexOptions) -> tuple[RunConfig, str | None]:
    """Options -> RunConfig, and the preset fallback note (if ``auto`` had to fall back)."""
    o = opts.view_as(CatalogIndexOptions)
    preset, note = presets.resolve(o.preset)
    clip = _space_spec(preset.clip, o.clip_family, o.clip_model, o.clip_weights, "open_clip")
    text = _space_spec(preset.text, None, o.text_model, o.text_weights, "hf_text")
    clap = _space_spec(preset.clap, None, o.clap_model, o.clap_weights, "hf_clap")
    # the preset's image space shares the image decode with the preset's clip-slot model; a clip model
    # of one's own (other preprocessing) leaves it out unless --image_model asks for it
    own_clip = o.clip_model not in (None, NONE)
    image = _space_spec(None if own_clip else preset.image, None, o.image_model, o.image_weights, "timm_image")
    asr = _asr_spec(preset, o, o.device)
    preset_asr = preset.asr_for(asr.backend) if asr is not None else (preset.asr[0] if preset.asr else None)
    columns = CatalogColumns(
        item_id=o.item_id_column, title=o.title_column, description=o.description_column,
        image_uris=o.image_column, audio_uri=o.audio_column,
        passthrough=tuple(c.strip() for c in o.passthrough_columns.split(",") if c.strip()),
    )
    fusion_kwargs = {"mode": o.fusion_mode, "attention_module": o.fusion_module}
    if o.modality_weights:
        fusion_kwargs["modality_weights"] = tuple({**dict(FusionConfig().modality_weights), **dict(o.modality_weights)}.items())
    if o.space_weights:
        fusion_kwargs["space_weights"] = o.space_weights
    config = RunConfig(
        read=ReadConfig(catalog=o.catalog or "", columns=columns, max_text_chars=o.max_text_chars),
        encode=EncodeConfig(clip=clip, text=text, device=o.device, precision=o.precision, batch_size=o.batch_size,
                            asr=asr, clap=clap, image=image, model_copies_per_gpu=o.model_copies_per_gpu,
                            image_decode=o.image_decode),
        write=WriteConfig(output=o.output, run_id=o.run_id, num_shards=o.num_shards,
                          rows_per_shard=o.rows_per_shard, vector_dtype=o.vector_dtype),
        fetch=FetchPolicy(max_bytes=o.max_media_bytes, timeout_s=o.fetch_timeout_s,
                          allow_http=o.allow_http, max_image_pixels=o.max_image_pixels,
                          allowed_schemes=_csv(o.allowed_media_schemes), allowed_roots=_csv(o.allowed_media_roots),
                          allowed_hosts=_csv(o.allowed_hosts), allow_private_hosts=o.allow_private_hosts,
                          ).with_default_root(_local_abspath(catalog_root(o.catalog or ""))),
        max_failure_fraction=o.max_failure_fraction,
        fusion=FusionConfig(**fusion_kwargs),
        audio=AudioPolicy(max_seconds=o.max_audio_seconds, silence_dbfs=o.silence_dbfs),
        index=IndexConfig(enabled=o.index == "on", factory=o.index_factory, nlist=o.index_nlist, m=o.index_m,
                          nbits=o.index_nbits, opq=o.index_opq, metric=o.index_metric,
                          memory_gb=o.index_memory_gb, train_size=o.index_train_size,
                          num_queries=o.index_queries, target_recall=o.target_recall, merge=o.merge_index,
                          max_query_ms=o.max_query_ms, recall_queries=o.recall_queries,
                          shard_vectors=o.index_shard_vectors, reuse_quantizer=o.reuse_quantizer,
                          quantizer_drift_tolerance=o.quantizer_drift_tolerance),
        media_errors=o.media_errors,
        progress_interval_s=o.progress_interval_s,
        decode_threads=o.decode_threads,
        torch_threads=o.torch_threads,
        items_per_batch=o.items_per_batch,
        incremental=IncrementalConfig(previous_run=o.previous_run, change_detection=o.change_detection,
                                      keep_runs=o.keep_runs),
        preset=preset.name if (clip, text, clap, image, asr) == (preset.clip, preset.text, preset.clap, preset.image,
                                                                 preset_asr)
        else f"{preset.name}+overrides",
    )
    return config, note
