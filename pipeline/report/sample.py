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
    return encode_thumbnail(shrink(image, side), max_bytes)


def shrink(image: Image.Image, side: int = THUMB_SIDE) -> Image.Image:
    """The thumbnail's pixels: RGB, at most ``side`` on the longest edge (the first half of make_thumbnail)."""
    small = image.convert("RGB")
    small.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return small


def encode_thumbnail(small: Image.Image, max_bytes: int = THUMB_MAX_BYTES) -> bytes | None:
    """:func:`shrink`'s image as a JPEG of at most ``max_bytes`` bytes; None if it cannot fit."""
    for quality in (80, 60, 40):
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG", quality=quality)
        if buffer.tell() <= max_bytes:
            return buffer.getvalue()
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

    def holds(self, key: int) -> bool:
        """Whether ``key``, offered earlier, is still among the smallest (the bound only ever falls, so an
        evicted key is never below it again)."""
        return len(self._heap) < self._size or key <= -self._heap[0]

    def offer(self, item_id: str) -> bool:
        key = sample_key(item_id)
        if len(self._heap) < self._size:
            heapq.heappush(self._heap, -key)
            return True
        if key < -self._heap[0]:
            heapq.heapreplace(self._heap, -key)
            return True
        return False


class PendingThumbnails:
    """Sample candidates' shrunk pixels, made into JPEGs only for those still within ``bound`` at :meth:`flush`.

    A worker offers a few thousand candidates to its bound over a long bundle (``size * (1 + ln(n / size))``
    for n items in random order: 2,356 at 20,000) of which only ``size`` can stay in it; a JPEG each cost
    ~0.1 CPU-ms from 32 px pixels, ~0.4 from 224 px (docs/BENCHMARKS.md, issue 11 rounds 5 and 8). The
    shrink (PIL, C) is done at once, so what waits is at most ``side`` pixels square; entries that left the
    bound are dropped whenever more than ``2 * size`` wait, so memory stays bounded.
    """

    def __init__(self, bound: LocalBound, size: int = SAMPLE_SIZE, side: int = THUMB_SIDE):
        self._bound, self._limit, self._side = bound, 2 * size, side
        self._pending: dict[int, tuple[str, Image.Image]] = {}

    def add(self, item_id: str, image: Image.Image) -> None:
        """Keeps ``image``'s thumbnail pixels for ``item_id`` (offered to the bound already); a failure only
        costs the report its tile."""
        try:
            small = shrink(image, self._side)
        except Exception:  # noqa: BLE001 - only the report's tile loses its photo
            return
        self._pending[sample_key(item_id)] = (item_id, small)
        if len(self._pending) > self._limit:
            self._pending = {k: v for k, v in self._pending.items() if self._bound.holds(k)}

    def clear(self) -> None:
        self._pending = {}

    def __len__(self) -> int:
        return len(self._pending)

    def flush(self) -> list["Thumbnail"]:
        """The thumbnails of the waiting candidates still within the bound, in key order; nothing waits after."""
        out = []
        for key in sorted(k for k in self._pending if self._bound.holds(k)):
            item_id, small = self._pending[key]
            try:
                jpeg = encode_thumbnail(small)
            except Exception:  # noqa: BLE001 - only the report's tile loses its photo
                jpeg = None
            if jpeg:
                out.append(Thumbnail(key, item_id, jpeg))
        self._pending = {}
        return out


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
