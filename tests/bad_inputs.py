"""Builds the bad-input catalog: one row per reason code and per media security rule.

Generated into a temporary folder (no binary fixtures in git): a few Parquet
files (one per wrong column type, since a Parquet column has one type per
file), media files beside them, a symlink and a secret outside the catalog's
folder tree. ``EXPECTED`` says each row's fate: ``"embedded"`` or
``(stage, reason)`` of its dead letter.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from schemas.catalog import CATALOG_SCHEMA

MAX_TEXT_CHARS = 2_000  # the run's --max_text_chars; LONG_TEXT is far over it
MAX_MEDIA_BYTES = 200_000  # the run's --max_media_bytes
LONG_TEXT = "very long description " * 50_000  # 1.1 M characters
NAN_TRIGGER = "NAN-TRIGGER"  # the fake text handler returns NaN for texts with this
RAISE_TRIGGER = "RAISE-TRIGGER"  # ... and raises for texts with this (its batch-mates must survive)

MAX_AUDIO_SECONDS = 5  # the run's --max_audio_seconds

EXPECTED: dict[str, object] = {
    # good rows, some of them batch-mates of failing ones
    "ok-image": "embedded",
    "ok-text": "embedded",
    "ok-text-2": "embedded",
    "long-text": "embedded",  # truncated to --max_text_chars, then to the model's token limit
    "dup": "embedded",  # the first occurrence; the second is a duplicate_id dead letter
    # read / validate
    "<null id>": ("validate", "invalid_row"),
    "wrong-title": ("validate", "invalid_row"),
    "wrong-images": ("validate", "invalid_row"),
    "wrong-audio": ("validate", "invalid_row"),
    "<float id>": ("validate", "invalid_row"),
    "dup#2": ("validate", "duplicate_id"),
    "empty-text": ("validate", "empty_item"),
    "all-null": ("validate", "empty_item"),
    # image decode
    "corrupt-jpeg": ("decode", "decode_failed"),
    "truncated-png": ("decode", "decode_failed"),
    "zero-byte": ("decode", "decode_failed"),
    "bomb-png": ("decode", "too_large"),  # refused from its header, before pixels are decoded
    "pdf": ("decode", "unsupported_format"),
    "big-file": ("fetch", "too_large"),  # byte cap, before decoding
    # fetch and the URI policy
    "missing-file": ("fetch", "missing_media"),
    "traversal": ("fetch", "forbidden_uri"),
    "absolute-outside": ("fetch", "forbidden_uri"),
    "symlink-escape": ("fetch", "forbidden_uri"),
    "fifo": ("fetch", "forbidden_uri"),
    "ftp-scheme": ("fetch", "forbidden_uri"),
    "javascript-uri": ("fetch", "forbidden_uri"),
    "data-uri-audio": ("fetch", "forbidden_uri"),
    "loopback-http": ("fetch", "forbidden_uri"),
    "private-http": ("fetch", "forbidden_uri"),
    "metadata-http": ("fetch", "forbidden_uri"),
    "host-not-allowed": ("fetch", "forbidden_uri"),
    # audio
    "truncated-audio": ("decode", "decode_failed"),
    "long-audio": ("decode", "audio_too_long"),
    # encode (through the fake handler)
    "nan-text": ("encode", "nonfinite_vector"),
    "raise-text": ("encode", "encode_failed"),
}

# Run options that the expectations assume.
RUN_OPTIONS = [
    "--max_text_chars", str(MAX_TEXT_CHARS), "--max_media_bytes", str(MAX_MEDIA_BYTES),
    "--max_audio_seconds", str(MAX_AUDIO_SECONDS),
    "--max_image_pixels", "4000000",
    # http on, so the address rules (not the http switch) refuse these rows; hosts other
    # than the listed IPs are refused by name, before any DNS lookup
    "--allow_http", "--allowed_hosts", "127.0.0.1,10.0.0.7,169.254.169.254",
]


def _jpeg(size=(64, 48), color=(30, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def _png(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A ~100-byte PNG whose header declares width x height pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _wav(seconds: float, rate: int = 8000) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    samples = (0.1 * np.sin(np.arange(int(seconds * rate)) * 0.05)).astype(np.float32)
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_U8")
    return buf.getvalue()


def _row(item_id, title=None, description=None, images=None, audio=None) -> dict:
    return {"item_id": item_id, "title": title, "description": description, "image_uris": images, "audio_uri": audio}


def build(root: Path) -> tuple[str, int]:
    """Writes the catalog under ``root``; returns (catalog glob, number of input rows)."""
    cat, outside = root / "catalog", root / "outside"
    media = cat / "media"
    media.mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(_jpeg())
    files = {
        "ok.jpg": _jpeg(),
        "corrupt.jpg": _jpeg()[:20] + os.urandom(64),
        "truncated.png": _png()[:70],
        "zero.jpg": b"",
        "bomb.png": bomb_png(),
        "doc.pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\n",
        "big.jpg": _jpeg((16, 16)) + b"\x00" * (MAX_MEDIA_BYTES + 1),
        "truncated.wav": _wav(2.0)[:300],
        "long.wav": _wav(MAX_AUDIO_SECONDS * 2.0),  # under the byte cap, over the duration cap
    }
    for name, data in files.items():
        (media / name).write_bytes(data)
    os.symlink(outside / "secret.jpg", media / "escape.jpg")
    os.mkfifo(media / "pipe.jpg")

    rows = [
        _row("ok-image", "blue mug", images=["media/ok.jpg"]),
        _row("ok-text", "canvas tote bag", "sturdy and washable"),
        _row("ok-text-2", "steel water bottle"),
        _row("long-text", LONG_TEXT),
        _row("dup", "first dup"),
        _row("dup", "second dup"),
        _row(None, "row without an id"),
        _row("empty-text", "   ", "\t"),
        _row("all-null"),
        _row("corrupt-jpeg", "x", images=["media/corrupt.jpg"]),
        _row("truncated-png", "x", images=["media/truncated.png"]),
        _row("zero-byte", "x", images=["media/zero.jpg"]),
        _row("bomb-png", "x", images=["media/bomb.png"]),
        _row("pdf", "x", images=["media/doc.pdf"]),
        _row("big-file", "x", images=["media/big.jpg"]),
        _row("missing-file", "x", images=["media/nope.jpg"]),
        _row("traversal", "x", images=["../../../../../../etc/passwd"]),
        _row("absolute-outside", "x", images=[str(outside / "secret.jpg")]),
        _row("symlink-escape", "x", images=["media/escape.jpg"]),
        _row("fifo", "x", images=["media/pipe.jpg"]),
        _row("ftp-scheme", "x", images=["ftp://files.example.com/a.jpg"]),
        # no '//': still a scheme, never a relative path under the catalog's folder
        _row("javascript-uri", "x", images=["javascript:alert(1)"]),
        _row("data-uri-audio", "x", audio="data:audio/wav;base64,UklGRg=="),
        _row("loopback-http", "x", images=["http://127.0.0.1:9/a.jpg"]),
        _row("private-http", "x", images=["http://10.0.0.7/a.jpg"]),
        _row("metadata-http", "x", images=["http://169.254.169.254/latest/meta-data/iam/"]),
        _row("host-not-allowed", "x", images=["https://evil.example.net/a.jpg"]),
        _row("truncated-audio", audio="media/truncated.wav"),
        _row("long-audio", audio="media/long.wav"),
        _row("nan-text", f"lamp {NAN_TRIGGER}"),
        _row("raise-text", f"chair {RAISE_TRIGGER}"),
    ]
    # real exports do carry null ids, whatever the canonical schema says
    schema = CATALOG_SCHEMA.set(0, CATALOG_SCHEMA.field("item_id").with_nullable(True))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), cat / "part-0.parquet")
    # wrong-typed fields: a Parquet column has one type per file, so one file each
    pq.write_table(pa.table({"item_id": ["wrong-title"], "title": pa.array([42], pa.int64())}),
                   cat / "part-1-title.parquet")
    pq.write_table(pa.table({"item_id": ["wrong-images"], "title": ["x"], "image_uris": pa.array([7], pa.int64())}),
                   cat / "part-2-images.parquet")
    pq.write_table(pa.table({"item_id": ["wrong-audio"], "title": ["x"], "audio_uri": [["a.wav"]]}),
                   cat / "part-3-audio.parquet")
    pq.write_table(pa.table({"item_id": pa.array([1.5], pa.float64()), "title": ["x"]}), cat / "part-4-id.parquet")
    return str(cat / "*.parquet"), len(rows) + 4
