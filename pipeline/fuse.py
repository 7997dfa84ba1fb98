"""Stage 4: gather each item's vectors and failures, decide its fate, fuse.

Every item that reached this stage leaves it exactly once: as an
:class:`EmbeddingRecord` (main) or as a :class:`DeadLetter` (``dead``).
"""
from __future__ import annotations

import hashlib
import json

import apache_beam as beam
from apache_beam.metrics import Metrics

from encoders.asr import Transcript
from encoders.fusion import FusionConfig, FusionError, Layout, fuse
from pipeline import faults, progress
from pipeline.config import Route
from pipeline.records import ItemFailure, MediaDigest, ModalityVector
from pipeline.stage_metrics import StageTimer
from schemas.catalog import CatalogItem
from schemas.dead_letter import DeadLetter, Reason, Stage
from schemas.embeddings import EmbeddingRecord

DEAD = "dead"
NAMESPACE = "catalog_index.fuse"
_MEDIA_STAGES = (Stage.FETCH, Stage.DECODE)


def content_hash(item: CatalogItem, digests: list[MediaDigest], model_fingerprint: str) -> str:
    """sha256 over what determines the item's vector: its text, its media bytes, the models."""
    payload = {
        "text": item.text,
        "media": sorted((d.modality, d.index, d.sha256) for d in digests),
        "uris": {"image": list(item.image_uris), "audio": item.audio_uri},
        "models": model_fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def expected_inputs(item: CatalogItem, route: Route, transcript: Transcript | None = None) -> int:
    """How many vectors ``route`` should produce for ``item``.

    Audio reaches the text towers only as a transcript that holds speech: a
    product sound without words gives no transcript vector, and that is not
    a failure (CLAP or the item's other modalities may still cover it).
    """
    if route.modality == "text":
        return 1 if item.text else 0
    if route.modality == "image":
        return len(item.image_uris)
    if route.modality == "audio" and route.via == "transcript":
        return 1 if transcript is not None and transcript.is_speech else 0
    if route.modality == "audio":
        return 1 if item.audio_uri else 0
    return 0


class _Fuse(beam.DoFn):
    def __init__(self, routes: tuple[Route, ...], layout: Layout, fusion: FusionConfig,
                 model_fingerprint: str, media_errors: str):
        self._routes, self._layout, self._fusion = routes, layout, fusion
        self._fingerprint, self._media_errors = model_fingerprint, media_errors
        self._embedded = Metrics.counter(NAMESPACE, "embedded")
        self._dead = Metrics.counter(NAMESPACE, "dead_letters")
        self._attention = None
        self._timer = StageTimer("fuse")

    def setup(self):
        # the trained module is loaded in the worker (never pickled) and checked against the recorded sha256
        self._attention = load_attention(self._fusion, self._routes, self._layout)

    def _dead_letter(self, item: CatalogItem, stage: Stage, reason: Reason, detail: str, source: str = ""):
        self._dead.inc()
        return beam.pvalue.TaggedOutput(DEAD, DeadLetter(item.item_id, stage, reason, detail, source or item.source))

    def process(self, element):
        with self._timer.batch(1):  # outputs are collected first so the time excludes downstream steps
            outputs = list(self._fuse(element))
        yield from outputs

    def _fuse(self, element):
        item_id, grouped = element
        items: list[CatalogItem] = list(grouped["item"])
        if len(items) != 1:
            raise RuntimeError(f"item {item_id!r} reached fusion {len(items)} times; keys must be unique after read")
        item = items[0]
        failures: list[ItemFailure] = sorted(grouped["failed"], key=lambda f: (f.stage.value, f.source, f.detail))
        vectors: list[ModalityVector] = list(grouped["vectors"])
        digests: list[MediaDigest] = list(grouped["digests"])
        transcripts: list[Transcript] = list(grouped.get("transcripts", ()))
        if len(transcripts) > 1:
            raise RuntimeError(f"item {item_id!r} got {len(transcripts)} transcripts; it has one audio clip")
        transcript = transcripts[0] if transcripts else None

        fatal = [f for f in failures if not (self._media_errors == "drop_media" and f.stage in _MEDIA_STAGES)]
        if fatal:
            first = fatal[0]
            more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
            yield self._dead_letter(item, first.stage, first.reason, first.detail + more, first.source)
            return
        by_route = {}
        for v in vectors:
            by_route.setdefault((v.space, v.modality), []).append(v)
        for route in self._routes:
            got = len(by_route.get((route.space, route.modality), []))
            # a lost clip has no transcript, so transcript routes expect nothing from it already
            lost = 0 if route.via == "transcript" else sum(
                1 for f in failures if f.modality == route.modality and f.stage in _MEDIA_STAGES)
            expected = expected_inputs(item, route, transcript)
            if got + lost != expected:
                raise RuntimeError(f"item {item_id!r}: {route.modality}->{route.space} produced {got} vectors, "
                                   f"{lost} failures, expected {expected}")
        nested: dict[str, dict[str, list]] = {}
        for (space, modality), vs in by_route.items():
            nested.setdefault(space, {})[modality] = [v.vector for v in sorted(vs, key=lambda v: v.index)]
        try:
            fused = fuse(nested, self._layout, self._fusion, attention=self._attention)
        except FusionError as e:
            reason = Reason.NONFINITE_VECTOR if "finite" in str(e) or "zero norm" in str(e) else Reason.EMPTY_ITEM
            detail = str(e) if reason is Reason.NONFINITE_VECTOR else "no modality that this run's models embed"
            if reason is Reason.EMPTY_ITEM and transcript is not None and not transcript.is_speech:
                detail = (f"the audio holds no recognizable speech (no-speech probability "
                          f"{transcript.no_speech_prob:.2f}) and nothing else of the item is embedded by this run")
            yield self._dead_letter(item, Stage.FUSE, reason, detail)
            return
        self._embedded.inc()
        progress.note("fused")
        yield EmbeddingRecord(
            item_id=item.item_id,
            vector=fused,
            modalities=tuple(sorted({m for _, m in by_route})),
            content_hash=item.content_hash or content_hash(item, digests, self._fingerprint),
            model_fingerprint=self._fingerprint,
            # images that made it into the vector: with --image_decode gpu, digests are taken before decoding
            num_images=len({v.index for v in vectors if v.modality == "image"}),
            attributes=item.attributes,
            transcript=transcript.text if transcript is not None else None,
        )
        faults.inject("fuse")  # test hook: fails a bundle after it has emitted a record


def load_attention(fusion: FusionConfig, routes, layout: Layout):
    """The trained attention of ``fusion`` as a ``fuse(attention=...)`` callable; None for the other rules."""
    if not fusion.attention_module:
        return None
    from encoders import attention

    module = attention.load(fusion.attention_module, fusion.attention_sha256)
    module.check_layout([(r.modality, r.space) for r in routes], layout)
    return module.weights_fn()


class FuseItems(beam.PTransform):
    """{item, vectors, failed, digests} keyed by item id -> EmbeddingRecord (main) / DeadLetter (dead)."""

    def __init__(self, routes, layout: Layout, fusion: FusionConfig, model_fingerprint: str, media_errors: str):
        super().__init__()
        load_attention(fusion, routes, layout)  # fail at launch, not in every worker, on a mismatched module
        self._fn = _Fuse(tuple(routes), layout, fusion, model_fingerprint, media_errors)

    def expand(self, inputs: dict):
        out = (
            inputs
            | "GroupPerItem" >> beam.CoGroupByKey()
            | "Fuse" >> beam.ParDo(self._fn).with_outputs(DEAD, main="records")
        )
        return {"records": out.records, "dead": out[DEAD]}
