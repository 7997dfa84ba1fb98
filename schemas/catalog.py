"""The catalog input: its schema as code, the column mapping, and row validation.

A catalog is one or many Parquet files. Only ``item_id`` is required; every
other field may be null. Which physical column holds which field is set by
:class:`CatalogColumns`, so a retailer's own snapshot needs no rewriting.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Mapping, Sequence

import pyarrow as pa

MAX_ITEM_ID_CHARS = 512
MAX_MEDIA_PER_ITEM = 32


@dataclasses.dataclass(frozen=True)
class CatalogColumns:
    """Maps the fields the pipeline knows to the catalog's physical column names."""

    item_id: str = "item_id"
    title: str = "title"
    description: str = "description"
    image_uris: str = "image_uris"
    audio_uri: str = "audio_uri"
    passthrough: tuple[str, ...] = ()  # copied into the output as JSON attributes

    def __post_init__(self) -> None:
        names = [self.item_id, self.title, self.description, self.image_uris, self.audio_uri]
        if any(not n for n in names):
            raise ValueError(f"catalog column names must be non-empty, got {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"catalog column names must be distinct, got {names}")


# The canonical layout of the bundled sample and of catalogs we generate.
# Real catalogs may differ: validation reads fields by name, not by position.
CATALOG_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("description", pa.string()),
        pa.field("image_uris", pa.list_(pa.string())),
        pa.field("audio_uri", pa.string()),
    ]
)


@dataclasses.dataclass(frozen=True)
class CatalogItem:
    """A validated catalog row, the unit that flows through every stage."""

    item_id: str
    title: str | None = None
    description: str | None = None
    image_uris: tuple[str, ...] = ()
    audio_uri: str | None = None
    base_uri: str = ""  # directory of the catalog file; relative media URIs resolve here
    source: str = ""  # "file#row", for dead letters and duplicate resolution
    attributes: str | None = None  # JSON of the passthrough columns
    # Set by the incremental stage when it hashed the item from media metadata
    # tokens; fusion then writes this hash instead of one over the fetched bytes.
    content_hash: str | None = None

    # cached: read, fusion, the content hash and the encoders each ask (the fields are frozen; a cached value
    # lives in the instance's __dict__, outside the fields that equality, repr and replace() use)
    @functools.cached_property
    def text(self) -> str | None:
        """Title and description as the one text the text towers see."""
        parts = [p for p in (self.title, self.description) if p]
        return ". ".join(parts) if parts else None

    @functools.cached_property
    def modalities(self) -> frozenset[str]:
        """The modalities this item has content in."""
        present = {"text": self.text, "image": self.image_uris, "audio": self.audio_uri}
        return frozenset(m for m, value in present.items() if value)

    @property
    def has_content(self) -> bool:
        return bool(self.modalities)


class InvalidRow(ValueError):
    """A catalog row that does not match the schema; names item, column and expectation."""

    def __init__(self, item_id: str | None, column: str, expected: str, got: Any):
        self.item_id = item_id
        self.column = column
        self.expected = expected
        self.got = got
        shown = repr(got)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(
            f"item {item_id!r}: column {column!r} expected {expected}, "
            f"got {type(got).__name__} {shown}"
        )


def _optional_text(row: Mapping[str, Any], column: str, item_id: str, max_chars: int) -> str | None:
    value = row.get(column)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRow(item_id, column, "string or null", value)
    value = value.strip()
    if not value:
        return None  # empty text is missing text, not a zero-length input to a model
    return value[:max_chars]


def _uri_list(row: Mapping[str, Any], column: str, item_id: str) -> tuple[str, ...]:
    value = row.get(column)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise InvalidRow(item_id, column, "URI string, list of URI strings, or null", value)
    uris = []
    for uri in value:
        if uri is None:
            continue
        if not isinstance(uri, str):
            raise InvalidRow(item_id, column, "list of URI strings", value)
        if uri.strip():
            uris.append(uri.strip())
    if len(uris) > MAX_MEDIA_PER_ITEM:
        raise InvalidRow(item_id, column, f"at most {MAX_MEDIA_PER_ITEM} URIs", f"{len(uris)} URIs")
    return tuple(uris)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def validate_row(
    row: Mapping[str, Any],
    columns: CatalogColumns = CatalogColumns(),
    *,
    base_uri: str = "",
    source: str = "",
    max_text_chars: int = 10_000,
) -> CatalogItem:
    """Turns one raw catalog row into a :class:`CatalogItem` or raises :class:`InvalidRow`."""
    raw_id = row.get(columns.item_id)
    if isinstance(raw_id, int) and not isinstance(raw_id, bool):
        raw_id = str(raw_id)  # integer ids are common in retail exports; keep them
    if not isinstance(raw_id, str) or not raw_id.strip():
        raise InvalidRow(None, columns.item_id, "non-empty string", raw_id)
    item_id = raw_id.strip()
    if len(item_id) > MAX_ITEM_ID_CHARS:
        raise InvalidRow(item_id[:40], columns.item_id, f"at most {MAX_ITEM_ID_CHARS} characters", item_id)

    audio = row.get(columns.audio_uri)
    if audio is not None and not isinstance(audio, str):
        raise InvalidRow(item_id, columns.audio_uri, "URI string or null", audio)
    attributes = None
    if columns.passthrough:
        attributes = json.dumps(
            {c: _json_safe(row.get(c)) for c in columns.passthrough}, ensure_ascii=False, sort_keys=True
        )
    return CatalogItem(
        item_id=item_id,
        title=_optional_text(row, columns.title, item_id, max_text_chars),
        description=_optional_text(row, columns.description, item_id, max_text_chars),
        image_uris=_uri_list(row, columns.image_uris, item_id),
        audio_uri=(audio.strip() or None) if audio else None,
        base_uri=base_uri,
        source=source,
        attributes=attributes,
    )


# --- column resolution, once before the pipeline starts -------------------------------------------

# field -> (option that names its column, modality it carries)
COLUMN_FIELDS = {
    "item_id": ("--item_id_column", "item id"),
    "title": ("--title_column", "text"),
    "description": ("--description_column", "text"),
    "image_uris": ("--image_column", "image"),
    "audio_uri": ("--audio_column", "audio"),
}
CONTENT_FIELDS = ("title", "description", "image_uris", "audio_uri")


class CatalogColumnError(ValueError):
    """A column the run was told to read is not in the catalog (or no content column is)."""


@dataclasses.dataclass(frozen=True)
class MissingColumn:
    """A content column left at its default name that (some of) the catalog's files lack."""

    field: str  # "image_uris"
    column: str  # the name looked for
    option: str  # "--image_column"
    modality: str  # "image"
    suggestion: str | None  # the closest existing column
    files_missing: int
    files: int

    def message(self) -> str:
        where = "" if self.files_missing == self.files else f" in {self.files_missing} of {self.files} files"
        hint = (f"; did you mean {self.option} {self.suggestion}?" if self.suggestion
                else f"; set {self.option} to read it")
        what = f"{self.modality} ({self.field})" if self.modality == "text" else self.modality
        return f"no column {self.column!r}{where}{hint} ({what} not read)"

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "message": self.message()}


# words that give a column away as a field's, when its name is not close to the default
FIELD_KEYWORDS = {
    "item_id": ("id", "sku"),
    "title": ("title", "name"),
    "description": ("desc", "text", "body"),
    "image_uris": ("image", "img", "photo", "picture", "pic"),
    "audio_uri": ("audio", "sound", "voice", "speech"),
}


def closest_column(name: str, present: Sequence[str], field: str = "") -> str | None:
    """The existing column most like ``name`` (case, plural, separators), else one whose name carries one of
    ``field``'s keywords (``photo_url`` for images), or None."""
    import difflib

    def norm(s: str) -> str:
        return s.lower().replace("-", "_").replace(" ", "_")

    by_norm = {norm(c): c for c in present}
    if norm(name) in by_norm:
        return by_norm[norm(name)]
    match = difflib.get_close_matches(norm(name), list(by_norm), n=1, cutoff=0.75)
    if match:
        return by_norm[match[0]]
    for keyword in FIELD_KEYWORDS.get(field, ()):
        hits = [c for n, c in sorted(by_norm.items()) if keyword in n.split("_") or n.startswith(keyword)]
        if hits:
            return hits[0]
    return None


def _absent_error(option: str, column: str, present: Sequence[str], files: Sequence[str],
                  field: str = "") -> CatalogColumnError:
    suggestion = closest_column(column, present, field)
    where = files[0] if len(files) == 1 else f"{len(files)} catalog files (first: {files[0]})"
    return CatalogColumnError(
        f"{option} {column!r}: no such column in {where}"
        + (f"; did you mean {option} {suggestion}?" if suggestion else "")
        + f" (catalog columns: {', '.join(sorted(present))})")


def resolve_columns(file_columns: Mapping[str, Sequence[str]], columns: CatalogColumns,
                    explicit: frozenset[str] = frozenset()) -> tuple[MissingColumn, ...]:
    """Checks ``columns`` against each catalog file's column names; returns the default ones that are missing.

    ``explicit`` holds the fields whose column was given on the command line
    (``"image_uris"``, ``"passthrough"``...). An explicitly named column, the
    item id column and every passthrough column must exist in every file
    (:class:`CatalogColumnError` otherwise, naming the closest existing
    column); a content column left at its default name may be absent, and is
    reported so the run can say which modality it did not read. A catalog
    with no content column at all is an error.
    """
    if not file_columns:
        raise CatalogColumnError("the catalog has no files")
    union = sorted({c for cols in file_columns.values() for c in cols})
    lacking = {f: [path for path, cols in file_columns.items() if getattr(columns, f) not in cols]
               for f in COLUMN_FIELDS}
    missing = []
    for field, (option, modality) in COLUMN_FIELDS.items():
        files = lacking[field]
        if not files:
            continue
        if field == "item_id" or field in explicit:
            raise _absent_error(option, getattr(columns, field), union, files, field)
        missing.append(MissingColumn(field, getattr(columns, field), option, modality,
                                     closest_column(getattr(columns, field), union, field), len(files), len(file_columns)))
    for column in columns.passthrough:
        files = [path for path, cols in file_columns.items() if column not in cols]
        if files:
            raise _absent_error("--passthrough_columns", column, union, files)
    if all(len(lacking[f]) == len(file_columns) for f in CONTENT_FIELDS):
        names = ", ".join(f"{COLUMN_FIELDS[f][0]} {getattr(columns, f)}" for f in CONTENT_FIELDS)
        raise CatalogColumnError(f"the catalog has none of the content columns ({names}); "
                                 f"catalog columns: {', '.join(union)}")
    return tuple(missing)
