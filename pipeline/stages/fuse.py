"""Fusion of one item: decide its fate from its vectors and failures, and fuse (plain logic).

Every item of a batch leaves :class:`ItemFuser` exactly once: as an
:class:`EmbeddingRecord` or as a :class:`DeadLetter`. The embed stage
(``pipeline/stages/embed.py``) calls it inside the worker that holds the batch, so
an item's modality vectors are never shuffled to meet each other.
"""
from __future__ import annotations

import hashlib
import json
from typing import Mapping, Sequence

import pyarrow as pa

from encoders.asr import Transcript
from encoders.fusion import FusionConfig, Layout, fuse_batch
from encoders.towers import sound_hears_speech
from pipeline.config import Route
from pipeline.stages.records import ItemFailure, MediaDigest, ModalityVector
from schemas.catalog import CatalogItem
from schemas.dead_letter import DeadLetter, Reason, Stage
from schemas.embeddings import ROW_FIELDS, EmbeddingRecord, columns_to_table, display_fields

NAMESPACE = "catalog_index.fuse"
_MEDIA_STAGES = (Stage.FETCH, Stage.DECODE)


# What json.dumps(..., ensure_ascii=False) writes for one str: the encoder calls this same C function
_str = json.encoder.encode_basestring


def _str_or_null(text: str | None) -> str:
    return "null" if text is None else _str(text)


def content_hash(item: CatalogItem, digests: list[MediaDigest], model_fingerprint: str) -> str:
    """sha256 over what determines the item's vector: its text, its media bytes, the models.

    The hashed text is ``json.dumps({"text", "media", "uris", "models"}, sort_keys=True,
    ensure_ascii=False)``, written here key by key in sorted order with json's own string encoder and
    its default separators (the same bytes at a fraction of the CPU: previous runs' hashes must match,
    ``tests/test_hot_path.py`` compares the two).
    """
    media = ", ".join(f"[{_str(m)}, {int(i)}, {_str(h)}]"
                      for m, i, h in sorted((d.modality, d.index, d.sha256) for d in digests))
    images = ", ".join(_str(uri) for uri in item.image_uris)
    payload = (f'{{"media": [{media}], "models": {_str(model_fingerprint)}, '
               f'"text": {_str_or_null(item.text)}, "uris": {{"audio": {_str_or_null(item.audio_uri)}, '
               f'"image": [{images}]}}}}')
    return hashlib.sha256(payload.encode()).hexdigest()


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


def _num_images(vectors: list[ModalityVector]) -> int:
    # images that made it into the vector: with --image_decode gpu, digests are taken before decoding
    return len({v.index for v in vectors if v.modality == "image"})


class ItemFuser:
    """Decides one item's fate from everything its batch produced for it, and fuses its vectors.

    Plain logic (no Beam): the embed stage calls it once per item of a batch,
    after every route has run. Returns an :class:`EmbeddingRecord` or a
    :class:`DeadLetter`; each item gets exactly one of the two.
    """

    def __init__(self, routes: tuple[Route, ...], layout: Layout, fusion: FusionConfig,
                 model_fingerprint: str, media_errors: str, attention=None):
        self._routes, self._layout, self._fusion = tuple(routes), layout, fusion
        self._fingerprint, self._media_errors = model_fingerprint, media_errors
        self._attention = attention

    def __call__(self, item: CatalogItem, vectors: list[ModalityVector], failures: list[ItemFailure],
                 digests: list[MediaDigest], transcript: Transcript | None) -> EmbeddingRecord | DeadLetter:
        """One item: a batch of one through :meth:`fuse_items`."""
        return self.fuse_items([item], [vectors], [failures], [digests], {0: transcript} if transcript is not None else {})[0]

    def fuse_items(self, items: Sequence[CatalogItem], vectors: Sequence[list[ModalityVector]],
                   failures: Sequence[list[ItemFailure]], digests: Sequence[list[MediaDigest]],
                   transcripts: Mapping[int, Transcript]) -> list[EmbeddingRecord | DeadLetter]:
        """Every item of a batch -> its record or dead letter, in order; the vectors are fused in one
        :func:`encoders.fusion.fuse_batch` call, and an item that cannot be fused fails alone."""
        out: list = [None] * len(items)
        fused, rows = self._fuse(items, vectors, failures, transcripts, out)
        for pos, row, by_route in rows:
            out[pos] = EmbeddingRecord(vector=fused[row], **self._fields(pos, by_route, items, vectors, digests, transcripts))
        return out

    def fuse_table(self, items: Sequence[CatalogItem], vectors: Sequence[list[ModalityVector]],
                   failures: Sequence[list[ItemFailure]], digests: Sequence[list[MediaDigest]],
                   transcripts: Mapping[int, Transcript], schema: pa.Schema) -> tuple[pa.Table | None, list[DeadLetter]]:
        """:meth:`fuse_items` as one table in ``schema`` (rows in batch order) and the dead letters in order,
        built column by column from the fused batch: no record object per item, no restacking of vectors.
        The same rows as ``records_to_table(fuse_items(...))`` (``tests/test_hot_path.py``)."""
        out: list = [None] * len(items)
        fused, rows = self._fuse(items, vectors, failures, transcripts, out)
        dead = [d for d in out if d is not None]
        if not rows:
            return None, dead
        fields: dict[str, list] = {name: [] for name in ROW_FIELDS}
        for pos, _, by_route in rows:
            for name, value in self._fields(pos, by_route, items, vectors, digests, transcripts).items():
                fields[name].append(value)
        return columns_to_table(fused[[row for _, row, _ in rows]], fields, schema), dead

    def _fields(self, pos: int, by_route: dict, items: Sequence[CatalogItem], vectors: Sequence[list[ModalityVector]],
                digests: Sequence[list[MediaDigest]], transcripts: Mapping[int, Transcript]) -> dict:
        """A fused item's :class:`EmbeddingRecord` fields but its vector: the one place they are decided, for
        the records of :meth:`fuse_items` and the columns of :meth:`fuse_table`."""
        item, transcript = items[pos], transcripts.get(pos)
        spoken = transcript.text if transcript is not None else None
        return {
            "item_id": item.item_id,
            "modalities": tuple(sorted({m for _, m in by_route})),
            "content_hash": item.content_hash or content_hash(item, digests[pos], self._fingerprint),
            "model_fingerprint": self._fingerprint,
            "num_images": _num_images(vectors[pos]),
            "attributes": item.attributes,
            "transcript": spoken,
            **display_fields(item.title, item.description, spoken),
        }

    def _fuse(self, items, vectors, failures, transcripts, out: list):
        """Fate checks and one fuse_batch call: dead letters go into ``out[pos]``; returns the fused array and
        ``[(pos, row of the fused array, the item's vectors by route)]`` for the items that were fused."""
        pending: list[tuple[int, dict]] = []
        flat: dict[tuple[str, str], tuple[list[int], list]] = {}
        for pos, item in enumerate(items):
            decided = self._check(item, vectors[pos], failures[pos], transcripts.get(pos))
            if isinstance(decided, DeadLetter):
                out[pos] = decided
                continue
            row = len(pending)
            pending.append((pos, decided))
            for key, vs in decided.items():
                rows, got = flat.setdefault(key, ([], []))
                rows.extend([row] * len(vs))
                got.extend(v.vector for v in (sorted(vs, key=lambda v: v.index) if len(vs) > 1 else vs))
        if not pending:
            return None, []
        fused, errors = fuse_batch(len(pending), flat, self._layout, self._fusion, attention=self._attention)
        fused_rows = []
        for row, (pos, by_route) in enumerate(pending):
            if errors[row] is not None:
                out[pos] = self._fusion_dead_letter(items[pos], errors[row], transcripts.get(pos))
            else:
                fused_rows.append((pos, row, by_route))
        return fused, fused_rows

    def _check(self, item: CatalogItem, vectors: list[ModalityVector], failures: list[ItemFailure],
               transcript: Transcript | None) -> dict[tuple[str, str], list[ModalityVector]] | DeadLetter:
        """An item's fatal failure as a dead letter, else its vectors by (space, modality), counts checked."""
        if failures:
            failures = sorted(failures, key=lambda f: (f.stage.value, f.source, f.detail))
            fatal = [f for f in failures if not (self._media_errors == "drop_media" and f.stage in _MEDIA_STAGES)]
        else:
            fatal = failures  # most items: nothing failed, nothing to sort
        if fatal:
            first = fatal[0]
            more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
            return DeadLetter(item.item_id, first.stage, first.reason, first.detail + more, first.source or item.source)
        by_route: dict[tuple[str, str], list[ModalityVector]] = {}
        for v in vectors:
            by_route.setdefault((v.space, v.modality), []).append(v)
        for route in self._routes:
            got = len(by_route.get((route.space, route.modality), []))
            # a lost clip has no transcript, so transcript routes expect nothing from it already
            lost = 0 if route.via == "transcript" or not failures else sum(
                1 for f in failures if f.modality == route.modality and f.stage in _MEDIA_STAGES)
            expected = expected_inputs(item, route, transcript)
            if got + lost != expected:
                raise RuntimeError(f"item {item.item_id!r}: {route.modality}->{route.space} produced {got} vectors, "
                                   f"{lost} failures, expected {expected}")
        if transcript is not None and transcript.is_speech:  # speech is for ASR, not for a sound-effects model
            for route in self._routes:
                if route.via == "waveform" and not sound_hears_speech(route.spec):
                    by_route.pop((route.space, route.modality), None)
        return by_route

    @staticmethod
    def _fusion_dead_letter(item: CatalogItem, error: str, transcript: Transcript | None) -> DeadLetter:
        reason = Reason.NONFINITE_VECTOR if "finite" in error or "zero norm" in error else Reason.EMPTY_ITEM
        detail = error if reason is Reason.NONFINITE_VECTOR else "no modality that this run's models embed"
        if reason is Reason.EMPTY_ITEM and transcript is not None and not transcript.is_speech:
            detail = (f"the audio holds no recognizable speech (no-speech probability "
                      f"{transcript.no_speech_prob:.2f}) and nothing else of the item is embedded by this run")
        return DeadLetter(item.item_id, Stage.FUSE, reason, detail, item.source)
