"""encoders.digest: the one sha256-of-a-file helper, and its call sites agree with it."""
from __future__ import annotations

import hashlib

from encoders import digest


def test_file_digest_matches_hashlib_across_block_boundaries(tmp_path):
    data = bytes(range(256)) * ((3 << 20) // 256) + b"tail"  # three 1 MiB blocks and a few bytes
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert digest.file_digest(str(path)) == (expected, len(data))
    assert digest.file_sha256(str(path)) == expected == digest.sha256_hex(data)
    (tmp_path / "empty").write_bytes(b"")
    assert digest.file_digest(str(tmp_path / "empty")) == (hashlib.sha256(b"").hexdigest(), 0)


def test_uris_go_through_beam_filesystems(tmp_path, monkeypatch):
    import io

    from apache_beam.io.filesystems import FileSystems

    opened = []

    def fake_open(path, compression_type=None):
        opened.append((path, compression_type))
        return io.BytesIO(b"abc")

    monkeypatch.setattr(FileSystems, "open", staticmethod(fake_open))
    assert digest.file_sha256("gs://bucket/module.safetensors") == hashlib.sha256(b"abc").hexdigest()
    assert opened == [("gs://bucket/module.safetensors", "uncompressed")]  # as stored, never decompressed


def test_call_sites_use_it(tmp_path):
    from encoders import fusion, specs
    from pipeline.stages.publish import file_entry

    path = tmp_path / "run" / "x.parquet"
    path.parent.mkdir()
    path.write_bytes(b"vectors")
    expected = hashlib.sha256(b"vectors").hexdigest()
    entry = file_entry(str(path), str(tmp_path / "run"))
    assert (entry.path, entry.bytes, entry.sha256) == ("x.parquet", 7, expected)
    assert fusion.file_sha256 is digest.file_sha256 and specs.file_sha256 is digest.file_sha256
    st = path.stat()
    assert specs._file_digest(str(path), st.st_size, st.st_mtime_ns) == expected
