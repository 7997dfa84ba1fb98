"""Typed records passed between stages, all keyed by item id."""
from __future__ import annotations

import dataclasses
import math
import typing
import zlib

import numpy as np

from schemas.catalog import CatalogItem
from schemas.dead_letter import Reason, Stage


# The two records made once per item and modality on the hot path are NamedTuples: as typed and immutable as
# a frozen dataclass, at about a third of its construction cost (frozen __init__ sets each field through
# object.__setattr__); docs/BENCHMARKS.md, issue 11 round 8.
class MediaDigest(typing.NamedTuple):
    """sha256 of one media object's bytes; part of the item's content hash."""

    modality: str
    index: int
    sha256: str


class ModalityVector(typing.NamedTuple):
    """One encoder output for one item: ``index`` tells an item's images apart."""

    space: str
    modality: str
    index: int
    vector: np.ndarray


@dataclasses.dataclass(frozen=True)
class ItemFailure:
    """Something that went wrong for one item at one stage; fusion decides the item's fate."""

    stage: Stage
    reason: Reason
    detail: str
    source: str = ""
    modality: str = ""  # "image" or "audio" for media failures: tells fusion which route lost an input


def item_to_tuple(item: CatalogItem) -> tuple:
    """A CatalogItem as a tuple of primitives: Beam's fast coder encodes it without pickle (the join)."""
    return (item.item_id, item.title, item.description, item.image_uris, item.audio_uri, item.base_uri,
            item.source, item.attributes, item.content_hash)


def item_from_tuple(t: tuple) -> CatalogItem:
    return CatalogItem(t[0], t[1], t[2], tuple(t[3]), t[4], t[5], t[6], t[7], t[8])


def bucket_of(item_id: str, num_buckets: int) -> int:
    """The join bucket of an item id: stable across processes and runs (crc32, not Python's salted ``hash``).

    Only which items meet in one ``Resolve`` call depends on it; no output does
    (a bucket's items are sorted by id before they are batched).
    """
    return zlib.crc32(item_id.encode()) % num_buckets


def join_buckets(catalog_rows: int, items_per_batch: int) -> int:
    """Buckets for the join by item id: a few encode batches of items each, at least one."""
    return max(1, math.ceil(catalog_rows / (4 * items_per_batch)))
