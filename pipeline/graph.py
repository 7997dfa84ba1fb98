"""The pipeline graph: read -> fetch -> encode per route -> fuse -> write -> publish."""
from __future__ import annotations

import functools

import apache_beam as beam

from encoders.asr import SAMPLE_RATE
from encoders.towers import audio_sample_rate, image_preprocess
from pipeline.config import RunConfig
from pipeline.encode import EncodeRoute
from pipeline.fetch import FetchImages
from pipeline.fetch_audio import FetchAudio
from pipeline.fuse import FuseItems
from pipeline.index import BuildIndex
from pipeline.publish import Publish
from pipeline.read import ReadCatalog
from pipeline.recall_queries import encode_recall_queries
from pipeline.incremental import Incremental, incremental_counts, resolve_previous_run
from pipeline.retention import apply_retention
from pipeline.transcribe import Transcribe, spoken_texts
from pipeline.write import WriteShards, dead_letters_to_table, embeddings_to_table
from schemas.dead_letter import DEAD_LETTER_SCHEMA
from schemas.embeddings import embeddings_schema


def _flatten(p: beam.Pipeline, label: str, pcolls: list) -> beam.PCollection:
    if not pcolls:
        return p | label >> beam.Create([])
    return tuple(pcolls) | label >> beam.Flatten()


def _texts(item):
    if item.text:
        yield (item.item_id, 0), item.text


def manifest_base(config: RunConfig, metadata: dict) -> dict:
    """The manifest's fixed part: what ran, with which models and settings."""
    return {
        "format_version": 1,
        "run_id": config.write.run_id,
        "catalog": config.read.catalog,
        "embeddings": {"dir": "embeddings", "dtype": config.write.vector_dtype, "dim": sum(b["dim"] for b in metadata["layout"])},
        "dead_letter": {"dir": "dead_letter"},
        **metadata,
    }


def build(p: beam.Pipeline, config: RunConfig, model_handlers: dict | None = None) -> dict:
    """Adds the whole job to ``p``; ``model_handlers`` (route or "asr" -> handler) lets tests swap models."""
    model_handlers = model_handlers or {}
    interval = config.progress_interval_s
    read = p | "Read" >> ReadCatalog(config.read, interval, frozenset(r.modality for r in config.encode.routes))
    metadata = config.metadata()
    # Unchanged items leave here with last run's vector; only new and changed ones go on to fetch/encode.
    previous = resolve_previous_run(config.write.output, config.incremental.previous_run, config.write.run_dir,
                                    metadata, config.write.vector_dtype)
    fetched_media = frozenset(r.modality for r in config.encode.routes) & {"image", "audio"}
    incremental = read["items"] | "Incremental" >> Incremental(
        config.incremental, previous, metadata["model_fingerprint"], config.fetch, fetched_media)
    items = incremental["encode"]

    vectors, failures, digests = [], [], []
    pixels = preprocess = None
    image_routes = [r for r in config.encode.routes if r.modality == "image"]
    if image_routes:
        preprocess = image_preprocess(image_routes[0].spec)
        fetched = items | "FetchImages" >> FetchImages(
            config.fetch, preprocess, threads=config.decode_threads, progress_interval_s=interval,
            decode=config.encode.image_decode == "cpu")
        pixels = fetched["pixels"]
        failures.append(fetched["failed"])
        digests.append(fetched["digests"])
    texts = items | "Texts" >> beam.FlatMap(_texts)
    payloads = {"text": texts, "image": pixels}
    transcripts = None
    audio_routes = [r for r in config.encode.routes if r.modality == "audio"]
    if audio_routes:
        # each audio model gets the clip at its own rate: Whisper 16 kHz, CLAP usually 48 kHz
        clap_rates = {r: audio_sample_rate(r.spec) for r in audio_routes if r.via == "waveform"}
        rates = set(clap_rates.values()) | ({SAMPLE_RATE} if any(r.via == "transcript" for r in audio_routes) else set())
        fetched = items | "FetchAudio" >> FetchAudio(config.fetch, config.audio, tuple(rates), progress_interval_s=interval)
        failures.append(fetched["failed"])
        digests.append(fetched["digests"])
        if SAMPLE_RATE in rates and config.encode.asr is not None:
            asr = fetched["clips"] | "Transcribe" >> Transcribe(config.encode.asr, config.encode, model_handlers.get("asr"))
            transcripts = asr["transcripts"]
            failures.append(asr["failed"])
            payloads["transcript"] = transcripts | "SpokenTexts" >> beam.FlatMap(spoken_texts)
        for route, rate in clap_rates.items():
            payloads[route] = fetched["clips"] | f"AudioFor_{route.space}" >> beam.MapTuple(
                lambda key, clip, r=rate: (key, clip.at(r)))

    for route in config.encode.routes:
        payload = payloads[route] if route.via == "waveform" else payloads[route.via or route.modality]
        label = f"Encode_{route.modality}_to_{route.space}" + (f"_via_{route.via}" if route.via else "")
        encoded = payload | label >> EncodeRoute(route, config.encode, model_handlers.get(route), preprocess,
                                                 config.fetch)
        vectors.append(encoded["vectors"])
        failures.append(encoded["failed"])

    fused = {
        "item": items | "KeyItems" >> beam.Map(lambda item: (item.item_id, item)),
        "vectors": _flatten(p, "AllVectors", vectors),
        "failed": _flatten(p, "AllFailures", failures),
        "digests": _flatten(p, "AllDigests", digests),
        "transcripts": _flatten(p, "AllTranscripts", [transcripts] if transcripts is not None else []),
    } | "Fuse" >> FuseItems(config.encode.routes, config.layout(), config.fusion,
                             metadata["model_fingerprint"], config.media_errors)

    run_dir = config.write.run_dir
    layout_dim = sum(b["dim"] for b in metadata["layout"])
    schema = embeddings_schema(layout_dim, config.write.vector_dtype, metadata)
    records = _flatten(p, "ReusedAndEncoded", [incremental["reused"], fused["records"]])
    embedding_files = records | "WriteEmbeddings" >> WriteShards(
        f"{run_dir}/embeddings", embeddings_to_table, schema,
        num_shards=config.write.num_shards, rows_per_shard=config.write.rows_per_shard)
    dead = _flatten(p, "AllDeadLetters", [read["dead"], fused["dead"]])
    dead_files = dead | "WriteDeadLetters" >> WriteShards(
        f"{run_dir}/dead_letter", dead_letters_to_table, DEAD_LETTER_SCHEMA,
        rows_per_shard=config.write.rows_per_shard)

    publish_inputs = {
        "rows": read["rows"], "records": records, "dead": dead, "skipped": read["skipped"],
        "embedding_files": embedding_files, "dead_files": dead_files,
        "status": incremental["status"], "encoded": fused["records"],
    }
    if config.index.enabled:
        publish_inputs["index"] = embedding_files | "Index" >> BuildIndex(
            config.index, run_dir, layout_dim, previous, metadata["model_fingerprint"],
            recall_queries=encode_recall_queries(config.index.recall_queries, metadata, run_dir)
            if config.index.recall_queries else None)
    manifest = publish_inputs | "Publish" >> Publish(
        config.write.output, run_dir, config.write.run_id, manifest_base(config, metadata),
        max_failure_fraction=config.max_failure_fraction,
        incremental_counts=functools.partial(incremental_counts, previous=previous, config=config.incremental))
    # after LATEST points at the new run: only then may older runs go
    output, keep = config.write.output, config.incremental.keep_runs
    _ = manifest | "Retention" >> beam.Map(lambda m: apply_retention(output, keep, run_dir))
    return {"records": records, "dead": dead, "manifest": manifest}
