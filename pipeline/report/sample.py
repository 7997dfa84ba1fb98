"""The report's item sample: a deterministic set of items (smallest item-id hashes) with thumbnails.

Plain functions, no Beam. The gallery in ``report.html`` shows items from this
sample. Thumbnails are made from pixels the fetch stage has already decoded
(or, with ``--image_decode gpu``, from the bytes it has already fetched, under
the same URI policy): nothing is fetched again for the report. The fetch stage
makes a thumbnail only for items that can still be among the ``size`` smallest
keys it has seen (:class:`LocalBound`), so the cost is a few hundred resizes
per worker, not one per item.
"""
from __future__ import annotations

import dataclasses
import hashlib
import heapq
import io

from PIL import Image

SAMPLE_SIZE = 512  # items kept in the report sample (thumbnails are made for at most about this many)
THUMB_SIDE = 96  # longest side of a thumbnail, pixels
THUMB_MAX_BYTES = 16_000  # a thumbnail larger than this is re-encoded smaller, then dropped
TITLE_CHARS = 160
TEXT_CHARS = 300  # what a photo-less item shows in its tile


def sample_key(item_id: str) -> int:
    """The stable 63-bit hash that orders the sample (the same one the index stage samples by)."""
    return int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "big") >> 1


def make_thumbnail(image: Image.Image, side: int = THUMB_SIDE, max_bytes: int = THUMB_MAX_BYTES) -> bytes | None:
    """A JPEG of at most ``side`` pixels on its longest edge and ``max_bytes`` bytes; None if it cannot fit."""
    small = image.convert("RGB")
    small.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
    for quality in (80, 60, 40):
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG", quality=quality)
        if buffer.tell() <= max_bytes:
            return buffer.getvalue()
    return None


def thumbnail_or_none(image: Image.Image) -> bytes | None:
    """:func:`make_thumbnail`, or None if it fails: the report's thumbnail must never cost an item its vector."""
    try:
        return make_thumbnail(image)
    except Exception:  # noqa: BLE001 - only the report's tile loses its photo
        return None


def thumbnail_from_bytes(data: bytes, max_pixels: int, side: int = THUMB_SIDE) -> bytes | None:
    """A thumbnail from already-fetched image bytes (JPEG draft mode decodes at reduced scale)."""
    from encoders.media import decode_image, probe_image

    try:
        image = probe_image(data, max_pixels)
        if image.format == "JPEG":
            image.draft("RGB", (side * 2, side * 2))
        return make_thumbnail(decode_image(data, max_pixels) if image.format != "JPEG" else image.convert("RGB"), side)
    except Exception:  # noqa: BLE001 - only the report's tile loses its photo
        return None


class LocalBound:
    """The ``size`` smallest keys one worker has offered so far: whether an item may still be sampled."""

    def __init__(self, size: int = SAMPLE_SIZE):
        self._size, self._heap = size, []  # max-heap through negated keys

    def offer(self, item_id: str) -> bool:
        key = sample_key(item_id)
        if len(self._heap) < self._size:
            heapq.heappush(self._heap, -key)
            return True
        if key < -self._heap[0]:
            heapq.heapreplace(self._heap, -key)
            return True
        return False


@dataclasses.dataclass(frozen=True)
class SampleItem:
    """What the gallery shows of one item: its title, and its text for items without a photo (each cut)."""

    key: int
    item_id: str
    title: str
    modalities: tuple[str, ...]
    text: str = ""


def _cut(text: str | None, chars: int) -> str:
    text = text or ""
    return text if len(text) <= chars else text[: chars - 1] + "\u2026"


def sample_item(item) -> SampleItem:
    """A catalog item's sample entry."""
    return SampleItem(sample_key(item.item_id), item.item_id, _cut(item.title or item.text, TITLE_CHARS),
                      tuple(sorted(item.modalities)), _cut(item.text, TEXT_CHARS))


def smallest(entries, size: int) -> list:
    """The ``size`` entries with the smallest ``key`` (ties broken by item id), in key order."""
    return heapq.nsmallest(size, entries, key=lambda e: (e.key, e.item_id))


@dataclasses.dataclass(frozen=True)
class Thumbnail:
    key: int
    item_id: str
    jpeg: bytes
