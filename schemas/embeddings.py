"""The embeddings output: one row per item, schema declared up front.

Everything a reader needs to interpret the vectors (models, dimension, dtype,
how the blocks of the vector were fused) travels in the Parquet key-value
metadata under :data:`METADATA_KEY`, so a file is self-describing.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"catalog_index"
FORMAT_VERSION = 1
VECTOR_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


@dataclasses.dataclass(frozen=True)
class EmbeddingRecord:
    """One item's fused, L2-normalized vector and where it came from."""

    item_id: str
    vector: np.ndarray  # float32 [dim], unit norm
    modalities: tuple[str, ...]  # e.g. ("image", "text"), sorted
    content_hash: str  # sha256 of the item's inputs (text, media bytes) and the config
    model_fingerprint: str  # sha256 over the fingerprints of every model used
    num_images: int = 0
    attributes: str | None = None
    transcript: str | None = None  # speech recognized in the item's audio; '' when it held none
    # what a person sees beside a search hit (display_fields), so search needs no catalog
    title: str | None = None
    snippet: str | None = None

    def to_row(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "vector": self.vector,
            "modalities": list(self.modalities),
            "content_hash": self.content_hash,
            "model_fingerprint": self.model_fingerprint,
            "num_images": self.num_images,
            "attributes": self.attributes,
            "transcript": self.transcript,
            "title": self.title,
            "snippet": self.snippet,
        }


TITLE_CHARS, SNIPPET_CHARS = 100, 120


def _shorten(text: str | None, limit: int) -> str | None:
    if not text:
        return None
    text = " ".join(text.split())  # newlines and runs of spaces would break a one-line hit
    if len(text) <= limit:
        return text
    cut = text[:limit - 1]
    return (cut.rsplit(" ", 1)[0] if " " in cut[limit // 2:] else cut) + "…"


def display_fields(title: str | None, description: str | None, transcript: str | None) -> dict[str, str | None]:
    """``title`` and ``snippet`` shown beside a search hit: the item's title, and a short description (or,
    without one, the start of its audio transcript, quoted). Both are shortened to one line."""
    snippet = _shorten(description, SNIPPET_CHARS)
    if snippet is None and transcript:
        spoken = _shorten(transcript, SNIPPET_CHARS - 9)
        snippet = f"(audio) “{spoken}”" if spoken else None
    return {"title": _shorten(title, TITLE_CHARS), "snippet": snippet}


def embeddings_schema(dim: int, dtype: str = "float32", metadata: dict[str, Any] | None = None) -> pa.Schema:
    """The Arrow schema of an embeddings shard; ``metadata`` goes in as JSON."""
    if dtype not in VECTOR_DTYPES:
        raise ValueError(f"vector dtype {dtype!r} is not one of {sorted(VECTOR_DTYPES)}")
    if dim <= 0:
        raise ValueError(f"vector dimension must be positive, got {dim}")
    schema = pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("vector", pa.list_(VECTOR_DTYPES[dtype], dim), nullable=False),
            pa.field("modalities", pa.list_(pa.string()), nullable=False),
            pa.field("content_hash", pa.string(), nullable=False),
            pa.field("model_fingerprint", pa.string(), nullable=False),
            pa.field("num_images", pa.int32(), nullable=False),
            pa.field("attributes", pa.string()),
            pa.field("transcript", pa.string()),
            pa.field("title", pa.string()),
            pa.field("snippet", pa.string()),
        ]
    )
    if metadata is not None:
        meta = dict(metadata, format_version=FORMAT_VERSION, dim=dim, dtype=dtype)
        schema = schema.with_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
    return schema


def records_to_table(records: list[EmbeddingRecord], schema: pa.Schema) -> pa.Table:
    """Casts a batch of records to ``schema`` (vectors to the schema's dtype)."""
    dim = schema.field("vector").type.list_size
    vectors = np.stack([r.vector for r in records]) if records else np.zeros((0, dim), np.float32)
    fields = {name: [getattr(r, name) for r in records] for name in ROW_FIELDS}
    fields["modalities"] = [list(m) for m in fields["modalities"]]
    return columns_to_table(vectors, fields, schema)


# an EmbeddingRecord's fields but its vector: the columns columns_to_table takes as lists
ROW_FIELDS = ("item_id", "modalities", "content_hash", "model_fingerprint", "num_images", "attributes",
               "transcript", "title", "snippet")


def columns_to_table(vectors: np.ndarray, fields: dict[str, list], schema: pa.Schema) -> pa.Table:
    """A batch as a table in ``schema``: ``vectors`` [rows, dim] (cast to the schema's dtype) and one list per
    other column (the :class:`EmbeddingRecord` fields, ``modalities`` as lists): no record objects needed."""
    vector_type = schema.field("vector").type
    np_dtype = np.float16 if vector_type.value_type == pa.float16() else np.float32
    flat = np.ascontiguousarray(vectors, dtype=np_dtype).reshape(-1)
    columns = {
        "item_id": pa.array(fields["item_id"], pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(flat), vector_type.list_size),
        "modalities": pa.array(fields["modalities"], pa.list_(pa.string())),
        "content_hash": pa.array(fields["content_hash"], pa.string()),
        "model_fingerprint": pa.array(fields["model_fingerprint"], pa.string()),
        "num_images": pa.array(fields["num_images"], pa.int32()),
        "attributes": pa.array(fields["attributes"], pa.string()),
        "transcript": pa.array(fields["transcript"], pa.string()),
        "title": pa.array(fields["title"], pa.string()),
        "snippet": pa.array(fields["snippet"], pa.string()),
    }
    return pa.Table.from_pydict(columns, schema=schema)


def read_metadata(path_or_schema: str | pa.Schema) -> dict[str, Any]:
    """The pipeline's metadata from an embeddings file (or its schema)."""
    schema = pq.read_schema(path_or_schema) if isinstance(path_or_schema, str) else path_or_schema
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError("not an embeddings file of this pipeline: no catalog_index metadata")
    return json.loads(raw)


def vectors_of(table: pa.Table) -> np.ndarray:
    """The ``vector`` column as a float32 matrix [rows, dim] without a Python loop."""
    column = table.column("vector").combine_chunks()
    dim = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
