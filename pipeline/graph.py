"""The pipeline graph: read -> join by id (duplicates, incremental) -> embed batches -> write -> index -> publish.

Items travel in batches from read to write: no Beam element between them is
one item. The read stage emits, per row group, one batch of items per join
bucket (a stable hash of the item id); the join hands each bucket to one
``Resolve`` call, which emits batches of at most ``--items_per_batch`` items;
fetch, decode, every encode route, transcription and fusion run inside the
worker that holds a batch (``pipeline/stages/embed.py``); the report's inputs (its
sample, statistics, counts) are per batch too. Three shuffles remain, none of
a modality vector:

* ``Incremental/JoinByIdBucket``: batches of catalog items (text and URIs)
  meet the previous run's and a killed attempt's ids and content hashes, by
  bucket. Duplicate ids are resolved here, and unchanged items are reused
  before any fetch; both need every row of an id in one place. The bucket
  count is fixed from the catalog's row count when the graph is built (a
  few batches per bucket) and changes no output: a bucket's ids are sorted
  before they are batched, and every output is sorted by id.
* ``Incremental/ReuseByFile`` (only with a reusable previous run or a killed
  attempt's pieces): the ids to reuse meet the file that holds their vectors,
  so each previous shard is read once, where it lies; only ids, hashes and
  today's attributes and display text travel, never the vectors.
* ``WriteEmbeddings/GroupByShard``: piece paths and id hashes meet their
  shard, so each shard file is written once, sorted by id (retries rewrite
  the same bytes).
"""
from __future__ import annotations

import dataclasses
import functools
import typing

import apache_beam as beam

from encoders.asr import SAMPLE_RATE
from encoders.towers import audio_sample_rate, image_preprocess
from pipeline.config import RunConfig
from pipeline.stages.embed import EmbedBatches
from pipeline.stages.encode import handler_for
from pipeline.stages.index import BuildIndex
from pipeline.stages.publish import Publish, PublishInputs, batch_stats
from pipeline.stages.read import ReadCatalog
from pipeline.query.recall_queries import encode_recall_queries
from pipeline.stages.incremental import Incremental, incremental_counts, resolve_previous_run, resume_pieces
from pipeline.stages.retention import apply_retention
from pipeline.stages.write import WriteShards, dead_letters_to_table
from pipeline.stages.records import join_buckets
from schemas.dead_letter import DEAD_LETTER_SCHEMA
from schemas.embeddings import embeddings_schema
from schemas.manifest import FORMAT_VERSION, Manifest

class JobOutputs(typing.NamedTuple):
    """What :func:`build` returns (each a PCollection), for callers that add to the job or assert on it."""

    embedding_files: beam.PCollection  # str: the written embeddings shards
    dead: beam.PCollection  # DeadLetter, from every stage
    manifest: beam.PCollection  # the published manifest (one dict)


def _flatten(p: beam.Pipeline, label: str, pcolls: list) -> beam.PCollection:
    if not pcolls:
        return p | label >> beam.Create([])
    return tuple(pcolls) | label >> beam.Flatten()


def manifest_base(config: RunConfig, metadata: dict) -> Manifest:
    """The manifest's fixed part: what ran, with which models and settings."""
    return Manifest.from_dict({
        "format_version": FORMAT_VERSION,
        "run_id": config.write.run_id,
        "catalog": config.read.manifest_entry(),
        "embeddings": {"dir": "embeddings", "dtype": config.write.vector_dtype, "dim": sum(b["dim"] for b in metadata["layout"])},
        "dead_letter": {"dir": "dead_letter"},
        **metadata,
    })


def embed_settings(config: RunConfig, model_handlers: dict) -> dict:
    """What the embed stage needs: each route's handler, the ASR handler, rates, preprocessing."""
    routes = config.encode.routes
    image_routes = [r for r in routes if r.modality == "image"]
    preprocess = image_preprocess(image_routes[0].spec) if image_routes else None
    handlers = {r: model_handlers.get(r) or handler_for(r, config.encode, preprocess, config.fetch) for r in routes}
    # each audio model gets the clip at its own rate: Whisper 16 kHz, CLAP usually 48 kHz
    clap_rates = {r: audio_sample_rate(r.spec) for r in routes if r.via == "waveform"}
    transcribed = any(r.via == "transcript" for r in routes) and config.encode.asr is not None
    rates = tuple(sorted(set(clap_rates.values()) | ({SAMPLE_RATE} if transcribed else set())))
    asr_handler = None
    if transcribed:
        from encoders.handlers import AsrHandler

        asr_handler = model_handlers.get("asr") or AsrHandler(
            config.encode.asr, device=config.encode.device, precision=config.encode.precision,
            batch_size=config.encode.batch_size)
    return dict(routes=routes, handlers=handlers, asr_handler=asr_handler, preprocess=preprocess,
                fetch=config.fetch, audio=config.audio, audio_rates=rates, clap_rates=clap_rates,
                decode_images=config.encode.image_decode == "cpu", device=config.encode.device,
                threads=config.decode_threads, decode_processes=config.decode_processes,
                torch_threads=config.torch_threads, progress_interval_s=config.progress_interval_s)


def catalog_rows(pattern: str) -> int:
    """The catalog's row count from its footers, or 0 where they cannot be read here (a Dataflow launcher
    without the filesystem's extra): the join then has one bucket per few batches of what can be counted."""
    from pipeline.catalog_files import CatalogFileError, inspect_catalog

    try:
        return inspect_catalog(pattern).num_rows
    except CatalogFileError:
        return 0


def build(p: beam.Pipeline, config: RunConfig, model_handlers: dict | None = None,
          num_rows: int | None = None) -> JobOutputs:
    """Adds the whole job to ``p``; ``model_handlers`` (route or "asr" -> handler) lets tests swap models.

    ``num_rows``: the catalog's row count (the launcher has read the footers); it sizes the join's buckets.
    """
    model_handlers = model_handlers or {}
    rows = catalog_rows(config.read.catalog) if num_rows is None else num_rows
    if config.decode_processes is None:  # auto: decided by the runner this pipeline will run on
        from pipeline.options import auto_decode_processes

        config = dataclasses.replace(config, decode_processes=auto_decode_processes(p.options, rows=rows))
    modalities = frozenset(r.modality for r in config.encode.routes)
    num_buckets = join_buckets(rows, config.items_per_batch)
    read = p | "Read" >> ReadCatalog(config.read, config.progress_interval_s, modalities, num_buckets)
    metadata = config.metadata()
    run_dir = config.write.run_dir
    layout_dim = sum(b["dim"] for b in metadata["layout"])
    schema = embeddings_schema(layout_dim, config.write.vector_dtype, metadata)

    # Unchanged items leave here with last run's vector; only new and changed ones go on to be embedded.
    previous = resolve_previous_run(config.write.output, config.incremental.previous_run, run_dir,
                                    metadata, config.write.vector_dtype)
    incremental = read.items | "Incremental" >> Incremental(
        config.incremental, previous, metadata["model_fingerprint"], config.fetch, modalities & {"image", "audio"},
        schema=schema, batch_items=config.items_per_batch, resume=resume_pieces(run_dir), num_buckets=num_buckets)

    embedded = incremental.encode | "Embed" >> EmbedBatches(
        layout=config.layout(), fusion=config.fusion, model_fingerprint=metadata["model_fingerprint"],
        media_errors=config.media_errors, schema=schema, **embed_settings(config, model_handlers))

    # the reused and the encoded batches are written and summarized each where it is made
    sources = (incremental.reused, embedded.records)
    embedding_files = sources | "WriteEmbeddings" >> WriteShards(
        f"{run_dir}/embeddings", schema, num_shards=config.write.num_shards,
        rows_per_shard=config.write.rows_per_shard)
    stats = _flatten(p, "AllBatchStats", [src | f"Summarize{name}" >> beam.Map(batch_stats)
                                          for name, src in zip(("Reused", "Encoded"), sources)])
    encoded = embedded.records | "EncodedRows" >> beam.Map(lambda t: t.num_rows)
    dead = _flatten(p, "AllDeadLetters", [read.dead, incremental.dead, embedded.dead])
    dead_files = (
        dead
        | "DeadLetterRows" >> beam.Map(lambda d: dead_letters_to_table([d]))
        | "WriteDeadLetters" >> WriteShards(f"{run_dir}/dead_letter", DEAD_LETTER_SCHEMA,
                                            rows_per_shard=config.write.rows_per_shard)
    )

    index = None
    if config.index.enabled:
        index = embedding_files | "Index" >> BuildIndex(
            config.index, run_dir, layout_dim, previous, metadata["model_fingerprint"],
            recall_queries=encode_recall_queries(config.index.recall_queries, metadata, run_dir)
            if config.index.recall_queries else None)
    publish_inputs = PublishInputs(
        rows=read.rows, records=stats, dead=dead, skipped=read.skipped,
        embedding_files=embedding_files, dead_files=dead_files, status=incremental.status, encoded=encoded,
        sample=incremental.sample, thumbnails=embedded.thumbnails, index=index)
    manifest = publish_inputs | "Publish" >> Publish(
        config.write.output, run_dir, config.write.run_id, manifest_base(config, metadata),
        max_failure_fraction=config.max_failure_fraction,
        incremental_counts=functools.partial(incremental_counts, previous=previous, config=config.incremental),
        previous=previous)
    # after LATEST points at the new run: only then may older runs go
    output, keep = config.write.output, config.incremental.keep_runs
    _ = manifest | "Retention" >> beam.Map(lambda m: apply_retention(output, keep, run_dir))
    return JobOutputs(embedding_files=embedding_files, dead=dead, manifest=manifest)
