import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.embeddings import EmbeddingRecord, embeddings_schema, read_metadata, records_to_table, vectors_of


def _records(n, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        v = rng.normal(size=dim).astype(np.float32)
        out.append(EmbeddingRecord(f"id-{i}", v / np.linalg.norm(v), ("image", "text"), f"h{i}", "fp", i % 3))
    return out


@pytest.mark.parametrize("n", [0, 1, 3, 1000])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_parquet_round_trip_keeps_schema_vectors_and_metadata(n, dtype):
    meta = {"models": {"clip": {"name": "m"}}, "fusion": {"mode": "mean"}}
    schema = embeddings_schema(8, dtype, meta)
    records = _records(n)
    buf = io.BytesIO()
    pq.write_table(records_to_table(records, schema), buf, row_group_size=64)
    table = pq.read_table(io.BytesIO(buf.getvalue()))
    assert table.schema.field("vector").type == pa.list_(pa.float16() if dtype == "float16" else pa.float32(), 8)
    assert table.num_rows == n
    got = read_metadata(table.schema)
    assert got["dim"] == 8 and got["dtype"] == dtype and got["fusion"] == {"mode": "mean"}
    if n:
        expected = np.stack([r.vector for r in records])
        tol = 1e-3 if dtype == "float16" else 0
        np.testing.assert_allclose(vectors_of(table), expected, atol=tol)
        assert table.column("item_id").to_pylist() == [r.item_id for r in records]


def test_schema_rejects_bad_dtype_and_dim():
    with pytest.raises(ValueError, match="float64"):
        embeddings_schema(4, "float64")
    with pytest.raises(ValueError, match="positive"):
        embeddings_schema(0)


def test_read_metadata_rejects_foreign_files():
    with pytest.raises(ValueError, match="not an embeddings file"):
        read_metadata(pa.schema([("a", pa.int32())]))
