"""Command-line options as a Beam ``PipelineOptions`` subclass, and their translation to a RunConfig."""
from __future__ import annotations

import argparse
import dataclasses
import os

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from encoders import families, presets
from encoders.asr import BACKENDS, COMPUTE_TYPES, AsrSpec, default_backend
from encoders.audio import AudioPolicy
from encoders.device import IMAGE_DECODERS
from encoders.fusion import FUSION_MODES, FusionConfig
from encoders.media import FetchPolicy
from encoders.specs import CLIP_FAMILIES, PRECISIONS, PRETRAINED, RANDOM, ModelSpec
from pipeline.config import (CHANGE_DETECTION, INDEX_METRICS, LATEST, MEDIA_ERROR_POLICIES, NONE,
                             REUSE_QUANTIZER, VECTOR_DTYPES, EncodeConfig, IncrementalConfig, IndexConfig, ReadConfig,
                             RunConfig, WriteConfig, catalog_root)
from schemas.catalog import CatalogColumns


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


def field_default(cls: type, name: str):
    """The default of dataclass ``cls``'s field ``name``: the one place an option's default is written."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{cls.__name__}.{name} has no default")
    raise ValueError(f"{cls.__name__} has no field {name!r}")


def _joined(values: tuple[str, ...]) -> str:
    return ",".join(values)


def _auto_if_none(value):
    return "auto" if value is None else value


def _auto_or_int(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number, got {text!r}") from None


# decoding processes --decode_processes auto starts at most: the one thread that runs the model, fusion and
# Beam takes ~0.2 CPU-ms per item (docs/BENCHMARKS.md), ~5,000 items/s, which 8 processes at ~1,500 images/s
# each outrun; more would only hold memory (~40-80 MB each)
MAX_AUTO_DECODE_PROCESSES = 8
# catalog rows below which auto keeps the threads: a pool of 2 takes ~0.3 s to start (0.35 CPU-s) and saved
# 0.07 (32 px) to 0.25 ms (224 px) of wall per image on 2 cores, so it pays back after ~1,200-4,000 images
MIN_AUTO_DECODE_ROWS = 2048


def direct_runner(options) -> bool:
    """No runner named, or the DirectRunner: what ``catalog-index run`` runs on Beam's FnApiRunner itself."""
    return options.view_as(StandardOptions).runner in (None, "DirectRunner", "direct")


def in_process_runner(options) -> bool:
    """Beam's in-memory runner in this process: no runner named, or the DirectRunner in memory."""
    return direct_runner(options) and \
        options.view_as(DirectOptions).direct_running_mode in (None, "in_memory")


def auto_decode_processes(options, cores: int | None = None, rows: int = 0) -> int:
    """``--decode_processes auto``: one per core (at most MAX_AUTO_DECODE_PROCESSES) where the pipeline runs
    in this process on 2+ cores, processes can be started and the catalog has ``rows`` >= MIN_AUTO_DECODE_ROWS
    (0: not known); else 0, the fetch threads. Elsewhere this process cannot see the workers: Dataflow's CPU
    workers run one SDK process per vCPU (each would start its own), and the multi-process DirectRunner one
    per --direct_num_workers; name N there (README, "Sizing workers"). Where processes cannot start, the fetch
    threads decode without the warning an explicit N gets."""
    from pipeline.stages.decode_pool import processes_supported

    if not in_process_runner(options) or 0 < rows < MIN_AUTO_DECODE_ROWS:
        return 0
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return min(cores, MAX_AUTO_DECODE_PROCESSES) if cores >= 2 and processes_supported() else 0


def _on_off(enabled: bool) -> str:
    return "on" if enabled else "off"


# option dest -> (config dataclass, field[, field default -> option default]): each option's default is
# read from its dataclass (tests/test_options.py walks the parser against this table)
OPTION_FIELDS: dict[str, tuple] = {
    "run_id": (WriteConfig, "run_id"), "num_shards": (WriteConfig, "num_shards"),
    "rows_per_shard": (WriteConfig, "rows_per_shard"), "vector_dtype": (WriteConfig, "vector_dtype"),
    "item_id_column": (CatalogColumns, "item_id"), "title_column": (CatalogColumns, "title"),
    "description_column": (CatalogColumns, "description"), "image_column": (CatalogColumns, "image_uris"),
    "audio_column": (CatalogColumns, "audio_uri"), "passthrough_columns": (CatalogColumns, "passthrough", _joined),
    "max_text_chars": (ReadConfig, "max_text_chars"),
    "device": (EncodeConfig, "device"), "precision": (EncodeConfig, "precision"),
    "batch_size": (EncodeConfig, "batch_size"), "model_copies_per_gpu": (EncodeConfig, "model_copies_per_gpu"),
    "image_decode": (EncodeConfig, "image_decode"),
    "decode_threads": (RunConfig, "decode_threads"),
    "decode_processes": (RunConfig, "decode_processes", _auto_if_none),
    "items_per_batch": (RunConfig, "items_per_batch"),
    "torch_threads": (RunConfig, "torch_threads"),
    "asr_language": (AsrSpec, "language", _auto_if_none), "asr_compute_type": (AsrSpec, "compute_type"),
    "asr_beam_size": (AsrSpec, "beam_size"),
    "max_audio_seconds": (AudioPolicy, "max_seconds"), "silence_dbfs": (AudioPolicy, "silence_dbfs"),
    "max_media_bytes": (FetchPolicy, "max_bytes"), "fetch_timeout_s": (FetchPolicy, "timeout_s"),
    "max_image_pixels": (FetchPolicy, "max_image_pixels"), "allow_http": (FetchPolicy, "allow_http"),
    "allowed_media_schemes": (FetchPolicy, "allowed_schemes", _joined),
    "allowed_media_roots": (FetchPolicy, "allowed_roots", _joined),
    "allowed_hosts": (FetchPolicy, "allowed_hosts", _joined),
    "allow_private_hosts": (FetchPolicy, "allow_private_hosts"),
    "media_errors": (RunConfig, "media_errors"), "max_failure_fraction": (RunConfig, "max_failure_fraction"),
    "space_weights": (FusionConfig, "space_weights"),
    "fusion_mode": (FusionConfig, "mode"), "fusion_module": (FusionConfig, "attention_module"),
    "index": (IndexConfig, "enabled", _on_off), "index_factory": (IndexConfig, "factory"),
    "index_nlist": (IndexConfig, "nlist"), "index_m": (IndexConfig, "m"), "index_nbits": (IndexConfig, "nbits"),
    "index_opq": (IndexConfig, "opq"), "index_metric": (IndexConfig, "metric"),
    "index_memory_gb": (IndexConfig, "memory_gb"), "index_train_size": (IndexConfig, "train_size"),
    "index_queries": (IndexConfig, "num_queries"), "target_recall": (IndexConfig, "target_recall"),
    "max_query_ms": (IndexConfig, "max_query_ms"), "recall_queries": (IndexConfig, "recall_queries"),
    "merge_index": (IndexConfig, "merge"), "index_shard_vectors": (IndexConfig, "shard_vectors"),
    "reuse_quantizer": (IndexConfig, "reuse_quantizer"),
    "quantizer_drift_tolerance": (IndexConfig, "quantizer_drift_tolerance"),
    "previous_run": (IncrementalConfig, "previous_run"), "change_detection": (IncrementalConfig, "change_detection"),
    "keep_runs": (IncrementalConfig, "keep_runs"),
    "progress_interval_s": (RunConfig, "progress_interval_s"),
}


def option_default(dest: str):
    """The default of option ``dest``, from its config dataclass field (OPTION_FIELDS)."""
    cls, name, *convert = OPTION_FIELDS[dest]
    value = field_default(cls, name)
    return convert[0](value) if convert else value


def _add(group, flag: str, **kwargs) -> None:
    """``add_argument`` with the default read from the option's config field."""
    default = option_default(flag.lstrip("-"))
    if kwargs.get("action") == "store_true":
        if default is not False:
            raise ValueError(f"{flag} is a store_true flag, but its config default is {default!r}")
    else:
        kwargs["default"] = default
    group.add_argument(flag, **kwargs)


class CatalogIndexOptions(PipelineOptions):
    """Options of ``catalog-index run``; every other flag goes to Beam (runner, workers...).

    Defaults are not written here: :func:`_add` reads each from its config dataclass.
    """

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("input and output")
        g.add_argument("--catalog", help="catalog Parquet path or glob (local, gs://, s3://...)")
        g.add_argument("--output", default="./out", help="output root; the run goes to OUTPUT/runs/<run_id>/")
        _add(g, "--run_id", help="run id (default: UTC time + random suffix)")
        _add(g, "--num_shards", type=int, help="embeddings shards (0: from --rows_per_shard)")
        _add(g, "--rows_per_shard", type=int)
        _add(g, "--vector_dtype", choices=list(VECTOR_DTYPES))

        g = parser.add_argument_group("catalog columns")
        _add(g, "--item_id_column")
        _add(g, "--title_column")
        _add(g, "--description_column")
        _add(g, "--image_column", help="one URI or a list of URIs per row")
        _add(g, "--audio_column")
        _add(g, "--passthrough_columns", help="comma-separated columns copied to `attributes`")
        _add(g, "--max_text_chars", type=int)

        g = parser.add_argument_group("models")
        g.add_argument("--preset", default="auto", help="auto | default | offline (see README)")
        g.add_argument("--clip_family", default=None, choices=list(CLIP_FAMILIES))
        g.add_argument("--clip_model", default=None, help="open_clip model name, or hf_clip hub id / dir; 'none' disables")
        g.add_argument("--clip_weights", default=None, help="open_clip: tag, checkpoint path or 'random'; hf: pretrained|random")
        g.add_argument("--text_model", default=None, help="sentence encoder hub id or dir; 'none' disables")
        g.add_argument("--text_weights", default=None, choices=[PRETRAINED, RANDOM])
        g.add_argument("--image_model", default=None,
                       help="timm ImageNet classifier for an image space of its own (e.g. tf_efficientnet_lite0); "
                            "'none' disables")
        g.add_argument("--image_weights", default=None, help="its state-dict file, or 'random'")
        _add(g, "--device", help="auto | cpu | cuda | cuda:N (CUDA absent is an error)")
        _add(g, "--precision", choices=list(PRECISIONS), help="autocast on CUDA")
        _add(g, "--batch_size", type=int, help="rows per forward pass; 0: from free GPU memory")

        g = parser.add_argument_group("scale-out (GPU workers)")
        _add(g, "--model_copies_per_gpu", type=int,
             help="0: each worker process loads its own copy on its own GPU; N: N copies per GPU shared "
                  "by all processes of a machine (Beam's shared model servers)")
        _add(g, "--image_decode", choices=list(IMAGE_DECODERS),
             help="cpu: PIL on fetch threads; gpu: nvJPEG batches on the model's GPU, PIL fallback per item")
        _add(g, "--decode_threads", type=int, help="fetch+decode threads per worker process")
        _add(g, "--decode_processes", type=_auto_or_int,
             help="processes that decode local images for each worker process, like DataLoader workers; "
                  "they share no GIL with the model's thread (0: the fetch threads decode them; auto: one "
                  f"per core, at most {MAX_AUTO_DECODE_PROCESSES}, where the pipeline runs in this process "
                  f"on 2+ cores and the catalog has {MIN_AUTO_DECODE_ROWS}+ rows, else 0)")
        _add(g, "--torch_threads", type=int,
             help="torch intra-op threads per worker process on a CPU device (0: torch's default, one per "
                  "core); 1 suits a small model on a shared machine, where idle threads spin; no effect "
                  "on GPU workers")
        _add(g, "--items_per_batch", type=int,
             help="catalog items per element from the join to the write; each batch is fetched, decoded, "
                  "encoded (in --batch_size sub-batches) and fused inside one worker")

        g = parser.add_argument_group("audio")
        g.add_argument("--asr_backend", default="auto", choices=["auto", *BACKENDS],
                       help="speech recognition: auto = transformers on CUDA, faster_whisper on CPU")
        g.add_argument("--asr_model", default=None,
                       help="Whisper model dir / hub id / faster-whisper size; 'none' disables speech recognition")
        g.add_argument("--asr_weights", default=None, choices=[PRETRAINED, RANDOM])
        _add(g, "--asr_language", help="auto (detect per clip) or a code such as en, zh")
        _add(g, "--asr_compute_type", choices=list(COMPUTE_TYPES),
             help="faster_whisper quantization (default: int8 on CPU, float16 on CUDA)")
        _add(g, "--asr_beam_size", type=int)
        g.add_argument("--clap_model", default=None, help="CLAP model (hf_clap) hub id or dir; 'none' disables "
                       "the sound space (the offline preset's aisfx too)")
        g.add_argument("--clap_weights", default=None, choices=[PRETRAINED, RANDOM])
        _add(g, "--max_audio_seconds", type=float, help="longer clips are dead-lettered (audio_too_long)")
        _add(g, "--silence_dbfs", type=float,
             help="clips whose RMS level stays below this are dead-lettered (silent_audio)")

        g = parser.add_argument_group("media")
        _add(g, "--max_media_bytes", type=int)
        _add(g, "--fetch_timeout_s", type=float)
        _add(g, "--max_image_pixels", type=int)
        _add(g, "--allow_http", action="store_true", help="allow http(s) media URIs")
        _add(g, "--allowed_media_schemes",
             help="comma-separated schemes read through Beam filesystems ('file' = local paths)")
        _add(g, "--allowed_media_roots",
             help="comma-separated roots that media must lie under (local folders, gs://bucket/prefix); "
                  "default: the catalog's own folder tree")
        _add(g, "--allowed_hosts",
             help="comma-separated http(s) hosts (.example.com: its subdomains); default: any public host")
        _add(g, "--allow_private_hosts", action="store_true",
             help="allow http(s) to loopback, private and link-local addresses (never metadata endpoints)")
        _add(g, "--media_errors", choices=list(MEDIA_ERROR_POLICIES),
             help="fail_item: an item with broken media is dead-lettered; drop_media: embed what is left")

        g = parser.add_argument_group("reliability")
        _add(g, "--max_failure_fraction", type=float,
             help="publish nothing and exit non-zero if more than this fraction of input rows are dead-lettered")

        g = parser.add_argument_group("fusion")
        # empty: FusionConfig's weights; named modalities override theirs (to_run_config)
        g.add_argument("--modality_weights", type=_weights, default=(), help="e.g. text=1,image=1")
        _add(g, "--space_weights", type=_weights, help="e.g. clip=1,text=1")
        _add(g, "--fusion_mode", choices=list(FUSION_MODES),
             help="mean: weighted average per space; concat: one block per (space, modality); "
                  "attention: per-item weights (agreement rule, or --fusion_module)")
        _add(g, "--fusion_module",
             help="attention module saved by `catalog-index fit-fusion` (safetensors); needs --fusion_mode attention")

        g = parser.add_argument_group("index (FAISS; chosen by measured recall within the memory budget unless given)")
        _add(g, "--index", choices=["on", "off"], help="build index shards after embedding")
        _add(g, "--index_factory", help="faiss factory string, e.g. OPQ32,IVF1024,PQ32x8")
        _add(g, "--index_nlist", type=int, help="IVF lists (0: automatic)")
        _add(g, "--index_m", type=int, help="PQ sub-quantizers (0: from the memory budget)")
        _add(g, "--index_nbits", type=int, help="bits per PQ code (0: automatic)")
        _add(g, "--index_opq", action="store_true", help="add an OPQ rotation before IVF-PQ")
        _add(g, "--index_metric", choices=list(INDEX_METRICS), help="inner product or L2")
        _add(g, "--index_memory_gb", type=float, help="memory budget of the whole index")
        _add(g, "--index_train_size", type=int, help="vectors to train on")
        _add(g, "--index_queries", type=int, help="held-out queries of the recall self-check")
        _add(g, "--target_recall", type=float,
             help="10-recall@10 the chosen index must reach at its recommended search setting")
        _add(g, "--max_query_ms", type=float, help="batched ms per query the recommended search setting may cost")
        _add(g, "--recall_queries",
             help="JSON-lines queries in eval's format (modality, query, relevant), encoded with the "
                  "run's models: the recall self-check and the index choice also measure them")
        _add(g, "--merge_index", action="store_true", help="also write index/merged.faiss")
        _add(g, "--index_shard_vectors", type=int,
             help="vectors per index shard: embeddings files are grouped into ceil(N / this) index "
                  "shards (at most one per file), each holding the trained quantizer once")
        _add(g, "--reuse_quantizer", choices=list(REUSE_QUANTIZER),
             help="auto: reuse the previous run's trained IVF-PQ when the model is unchanged and the "
                  "held-out quantization error has not drifted; never: always train")
        _add(g, "--quantizer_drift_tolerance", type=float,
             help="reuse while the error is at most (1 + this) x the error at training time")

        g = parser.add_argument_group("incremental runs")
        _add(g, "--previous_run",
             help=f"reuse vectors of unchanged items from this run: '{LATEST}' (the run OUTPUT/LATEST "
                  f"points to), a run directory, or '{NONE}' (encode everything)")
        _add(g, "--change_detection", choices=list(CHANGE_DETECTION),
             help="media change token: bytes (sha256, exact) or metadata (size + mtime, reads no bytes)")
        _add(g, "--keep_runs", type=int, help="published runs kept after this one is published (0 keeps all)")

        g = parser.add_argument_group("progress")
        _add(g, "--progress_interval_s", type=float, help="0 disables progress lines")


# option dest -> CatalogColumns field, to know which columns were named on the command line
_COLUMN_OPTIONS = {dest: spec[1] for dest, spec in OPTION_FIELDS.items() if spec[0] is CatalogColumns}


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
    if weights is None and families.get(family).packaged_weights is not None:  # timm_image: EfficientNet-Lite0
        weights = families.packaged_weights(family, model)
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
        passthrough=_csv(o.passthrough_columns),
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
        decode_processes=None if o.decode_processes == "auto" else o.decode_processes,
        torch_threads=o.torch_threads,
        items_per_batch=o.items_per_batch,
        incremental=IncrementalConfig(previous_run=o.previous_run, change_detection=o.change_detection,
                                      keep_runs=o.keep_runs),
        preset=preset.name if (clip, text, clap, image, asr) == (preset.clip, preset.text, preset.clap, preset.image,
                                                                 preset_asr)
        else f"{preset.name}+overrides",
    )
    return config, note
