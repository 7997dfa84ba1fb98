"""Stage 4: gather each item's vectors and failures, decide its fate, fuse.

Every item that reached this stage leaves it exactly once: as an
:class:`EmbeddingRecord` (main) or as a :class:`DeadLetter` (``dead``).
"""
from __future__ import annotations

import hashlib
import json

import apache_beam as beam
from apache_beam.metrics import Metrics

from encoders.fusion import FusionConfig, FusionError, Layout, fuse
from pipeline import progress
from pipeline.config import Route
from pipeline.records import ItemFailure, MediaDigest, ModalityVector
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


def expected_inputs(item: CatalogItem, route: Route) -> int:
    """How many vectors ``route`` should produce for ``item``."""
    if route.modality == "text":
        return 1 if item.text else 0
    if route.modality == "image":
        return len(item.image_uris)
    return 0


class _Fuse(beam.DoFn):
    def __init__(self, routes: tuple[Route, ...], layout: Layout, fusion: FusionConfig,
                 model_fingerprint: str, media_errors: str):
        self._routes, self._layout, self._fusion = routes, layout, fusion
        self._fingerprint, self._media_errors = model_fingerprint, media_errors
        self._embedded = Metrics.counter(NAMESPACE, "embedded")
        self._dead = Metrics.counter(NAMESPACE, "dead_letters")

    def _dead_letter(self, item: CatalogItem, stage: Stage, reason: Reason, detail: str, source: str = ""):
        self._dead.inc()
        return beam.pvalue.TaggedOutput(DEAD, DeadLetter(item.item_id, stage, reason, detail, source or item.source))

    def process(self, element):
        item_id, grouped = element
        items: list[CatalogItem] = list(grouped["item"])
        if len(items) != 1:
            raise RuntimeError(f"item {item_id!r} reached fusion {len(items)} times; keys must be unique after read")
        item = items[0]
        failures: list[ItemFailure] = sorted(grouped["failed"], key=lambda f: (f.stage.value, f.source, f.detail))
        vectors: list[ModalityVector] = list(grouped["vectors"])
        digests: list[MediaDigest] = list(grouped["digests"])

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
            lost = sum(1 for f in failures if route.modality == "image" and f.stage in _MEDIA_STAGES)
            if got + lost != expected_inputs(item, route):
                raise RuntimeError(f"item {item_id!r}: {route.modality}->{route.space} produced {got} vectors, "
                                   f"{lost} failures, expected {expected_inputs(item, route)}")
        nested: dict[str, dict[str, list]] = {}
        for (space, modality), vs in by_route.items():
            nested.setdefault(space, {})[modality] = [v.vector for v in sorted(vs, key=lambda v: v.index)]
        try:
            fused = fuse(nested, self._layout, self._fusion)
        except FusionError as e:
            reason = Reason.NONFINITE_VECTOR if "finite" in str(e) or "zero norm" in str(e) else Reason.EMPTY_ITEM
            detail = str(e) if reason is Reason.NONFINITE_VECTOR else "no modality that this run's models embed"
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
            num_images=sum(1 for d in digests if d.modality == "image"),
            attributes=item.attributes,
        )


class FuseItems(beam.PTransform):
    """{item, vectors, failed, digests} keyed by item id -> EmbeddingRecord (main) / DeadLetter (dead)."""

    def __init__(self, routes, layout: Layout, fusion: FusionConfig, model_fingerprint: str, media_errors: str):
        super().__init__()
        self._fn = _Fuse(tuple(routes), layout, fusion, model_fingerprint, media_errors)

    def expand(self, inputs: dict):
        out = (
            inputs
            | "GroupPerItem" >> beam.CoGroupByKey()
            | "Fuse" >> beam.ParDo(self._fn).with_outputs(DEAD, main="records")
        )
        return {"records": out.records, "dead": out[DEAD]}
