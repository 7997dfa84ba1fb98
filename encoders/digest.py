"""The one sha256-of-a-file helper, for the stages, the manifest, fusion modules and model fingerprints.

Beam-free at import (the encoders use it without ``pipeline/``): local paths are
read with ``open``; a URI (``gs://``, ``s3://``...) through Beam's FileSystems,
imported only then.
"""
from __future__ import annotations

import hashlib
from typing import BinaryIO

_BLOCK = 1 << 20


def sha256_hex(data: bytes) -> str:
    """sha256 of bytes already in memory (media, a module file just read)."""
    return hashlib.sha256(data).hexdigest()


def stream_digest(f: BinaryIO) -> tuple[str, int]:
    """(sha256 hex, byte count) of what is left in ``f``, read in 1 MiB blocks."""
    digest, size = hashlib.sha256(), 0
    while block := f.read(_BLOCK):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size


def _open(path: str) -> BinaryIO:
    if "://" not in path:
        return open(path, "rb")
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.open(path, compression_type="uncompressed")


def file_digest(path: str) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file: a local path or a URI on any Beam filesystem."""
    with _open(path) as f:
        return stream_digest(f)


def file_sha256(path: str) -> str:
    """sha256 hex of a file: a local path or a URI on any Beam filesystem."""
    return file_digest(path)[0]
