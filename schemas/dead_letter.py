"""Dead-letter rows: every input row that does not become an embedding says why.

The reason codes are a closed set so that dashboards and the manifest's counts
can be keyed on them; anything unexpected maps to the nearest code and keeps
the specifics in ``detail``.
"""
from __future__ import annotations

import dataclasses
import enum

import pyarrow as pa


class Stage(str, enum.Enum):
    """Pipeline stage at which an item failed."""

    VALIDATE = "validate"
    FETCH = "fetch"
    DECODE = "decode"
    ENCODE = "encode"
    FUSE = "fuse"
    INDEX = "index"


class Reason(str, enum.Enum):
    """Closed set of reason codes (documented in README.md)."""

    INVALID_ROW = "invalid_row"  # a required field missing or of the wrong type
    DUPLICATE_ID = "duplicate_id"  # a later occurrence of an item id seen before
    EMPTY_ITEM = "empty_item"  # no text, image or audio to embed at all
    MISSING_MEDIA = "missing_media"  # the URI names nothing that exists
    FETCH_FAILED = "fetch_failed"  # I/O or HTTP error while reading media
    FETCH_TIMEOUT = "fetch_timeout"
    FORBIDDEN_URI = "forbidden_uri"  # scheme, root or host not allowed by policy
    TOO_LARGE = "too_large"  # byte or pixel cap exceeded
    DECODE_FAILED = "decode_failed"  # corrupt or truncated media
    UNSUPPORTED_FORMAT = "unsupported_format"
    AUDIO_TOO_LONG = "audio_too_long"
    SILENT_AUDIO = "silent_audio"  # decoded audio whose level stays below the silence threshold
    ENCODE_FAILED = "encode_failed"  # the model raised on this item alone
    NONFINITE_VECTOR = "nonfinite_vector"  # NaN or inf came out of a model


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """One input row that ended here instead of in the embeddings."""

    item_id: str
    stage: Stage
    reason: Reason
    detail: str
    source: str = ""  # the catalog file and row, or the media URI at fault

    def to_row(self) -> dict:
        return {
            "item_id": self.item_id,
            "stage": self.stage.value,
            "reason": self.reason.value,
            "detail": self.detail[:2000],
            "source": self.source,
        }


class SkipReason(str, enum.Enum):
    """Why an input row was skipped: a counted outcome that is not a data failure."""

    # the item's content is only in modalities this run has no model for (an
    # image-only item in a text-only run): a configuration choice, not bad data
    NO_CONFIGURED_MODALITY = "no_configured_modality"


@dataclasses.dataclass(frozen=True)
class Skip:
    """An input row counted as skipped; the manifest counts these by reason."""

    item_id: str
    reason: SkipReason
    detail: str


DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("source", pa.string()),
    ]
)
