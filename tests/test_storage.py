"""Storage helpers: Parquet reads by Arrow for local paths, through FileSystems otherwise, with the same table."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage


@pytest.fixture()
def parquet_file(tmp_path):
    table = pa.table({"item_id": ["a", "b", "c"], "n": [1, 2, 3]})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    return str(path), table


@pytest.mark.parametrize("prefix", ["", "file://"])
def test_local_paths_are_read_by_arrow_with_the_columns_asked(parquet_file, prefix, monkeypatch):
    path, table = parquet_file
    monkeypatch.setattr(storage, "open_read", lambda p: pytest.fail("a local path went through FileSystems"))
    assert storage.is_local(prefix + path)
    assert storage.read_table(prefix + path).equals(table)
    assert storage.read_table(prefix + path, ["item_id"]).equals(table.select(["item_id"]))


def test_other_paths_go_through_filesystems_and_read_the_same(parquet_file, monkeypatch):
    path, table = parquet_file
    opened = []

    def open_read(p):
        opened.append(p)
        return open(p.removeprefix("gs://bucket"), "rb")

    monkeypatch.setattr(storage, "open_read", open_read)
    assert not storage.is_local("gs://bucket" + path)
    assert storage.read_table("gs://bucket" + path, ["n"]).equals(table.select(["n"]))
    assert opened == ["gs://bucket" + path]


def test_parquet_file_reads_row_groups_of_local_and_other_paths_alike(parquet_file, monkeypatch):
    path, table = parquet_file
    with storage.parquet_file(path) as local:
        assert local.read_row_group(0).equals(table)
    monkeypatch.setattr(storage, "open_read", lambda p: open(p.removeprefix("gs://bucket"), "rb"))
    with storage.parquet_file("gs://bucket" + path) as remote:
        assert remote.metadata.num_rows == 3 and remote.read_row_group(0, columns=["n"]).equals(table.select(["n"]))
