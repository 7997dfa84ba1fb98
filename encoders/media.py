"""Media fetching and image decoding, with the failures named.

Bytes come through Beam's FileSystems (local paths, gs://, s3://, every
registered scheme) or, when enabled, http(s) with a timeout and a byte cap.
Every failure is a :class:`MediaError` carrying a dead-letter reason code, so
the caller can turn it into a row instead of a crash.
"""
from __future__ import annotations

import dataclasses
import io
import posixpath
import socket
import urllib.error
import urllib.parse
import urllib.request

from PIL import Image, UnidentifiedImageError

from schemas.dead_letter import Reason

# Magic numbers of formats PIL decodes; bytes that start like one of these but
# fail to decode are corrupt, anything else is a format we do not support.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")


class MediaError(Exception):
    """A media item that could not be fetched or decoded; ``reason`` is a dead-letter code."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    """Limits on what media may be read and how much of it."""

    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0
    allow_http: bool = False
    max_image_pixels: int = 50_000_000  # decompression-bomb guard, checked before decoding

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.timeout_s <= 0 or self.max_image_pixels <= 0:
            raise ValueError(f"fetch limits must be positive: {self}")


def _scheme(uri: str) -> str:
    head, sep, _ = uri.partition("://")
    return head.lower() if sep and head.isalnum() else ""


def resolve_uri(uri: str, base_uri: str = "") -> str:
    """A catalog URI made absolute: relative paths resolve against the catalog file's folder."""
    if _scheme(uri) or uri.startswith("/") or not base_uri:
        return uri
    if _scheme(base_uri):
        return base_uri.rstrip("/") + "/" + uri
    return posixpath.normpath(posixpath.join(base_uri, uri))


def _read_capped(stream, max_bytes: int, uri: str) -> bytes:
    data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise MediaError(Reason.TOO_LARGE, f"{uri} is larger than the {max_bytes}-byte cap")
    return data


def _fetch_http(uri: str, policy: FetchPolicy) -> bytes:
    request = urllib.request.Request(uri, headers={"User-Agent": "catalog-index/1"})
    try:
        with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise MediaError(Reason.TOO_LARGE, f"{uri} declares {length} bytes, cap {policy.max_bytes}")
            return _read_capped(response, policy.max_bytes, uri)
    except urllib.error.HTTPError as e:
        reason = Reason.MISSING_MEDIA if e.code in (404, 410) else Reason.FETCH_FAILED
        raise MediaError(reason, f"{uri}: HTTP {e.code}") from None
    except (socket.timeout, TimeoutError) as e:
        raise MediaError(Reason.FETCH_TIMEOUT, f"{uri}: no answer in {policy.timeout_s}s") from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):
            raise MediaError(Reason.FETCH_TIMEOUT, f"{uri}: no answer in {policy.timeout_s}s") from None
        raise MediaError(Reason.FETCH_FAILED, f"{uri}: {e.reason}") from None


def fetch_bytes(uri: str, policy: FetchPolicy = FetchPolicy()) -> bytes:
    """Reads one media object, at most ``policy.max_bytes`` of it."""
    from apache_beam.io.filesystems import FileSystems

    scheme = _scheme(uri)
    if scheme in ("http", "https"):
        if not policy.allow_http:
            raise MediaError(Reason.FORBIDDEN_URI, f"{uri}: http(s) media is disabled (--allow_http)")
        return _fetch_http(uri, policy)
    try:
        if not FileSystems.exists(uri):
            raise MediaError(Reason.MISSING_MEDIA, f"{uri} does not exist")
        with FileSystems.open(uri, compression_type="uncompressed") as stream:
            return _read_capped(stream, policy.max_bytes, uri)
    except MediaError:
        raise
    except ValueError as e:  # FileSystems: no filesystem registered for this scheme
        raise MediaError(Reason.FORBIDDEN_URI, f"{uri}: {e}") from None
    except (OSError, IOError) as e:
        if isinstance(e, IsADirectoryError):
            raise MediaError(Reason.MISSING_MEDIA, f"{uri} is a directory") from None
        raise MediaError(Reason.FETCH_FAILED, f"{uri}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a remote filesystem's own error types
        raise MediaError(Reason.FETCH_FAILED, f"{uri}: {type(e).__name__}: {e}") from None


def probe_image(data: bytes, max_pixels: int = FetchPolicy.max_image_pixels) -> Image.Image:
    """Opens ``data``'s header only (no pixels decoded): a known format, within the pixel cap."""
    if not data:
        raise MediaError(Reason.DECODE_FAILED, "zero-length image")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        known = data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
        reason = Reason.DECODE_FAILED if known else Reason.UNSUPPORTED_FORMAT
        raise MediaError(reason, "not a decodable image" if known else "not an image format we read") from None
    except Image.DecompressionBombError as e:
        raise MediaError(Reason.TOO_LARGE, str(e)) from None
    except Exception as e:  # noqa: BLE001 - malformed headers raise assorted errors
        raise MediaError(Reason.DECODE_FAILED, f"image header unreadable: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise MediaError(Reason.TOO_LARGE, f"{width}x{height} pixels exceeds the {max_pixels}-pixel cap")
    return image


def decode_image(data: bytes, max_pixels: int = FetchPolicy.max_image_pixels) -> Image.Image:
    """Bytes to an RGB image; refuses bombs by header size before decoding pixels."""
    image = probe_image(data, max_pixels)
    try:
        image.load()
    except Image.DecompressionBombError as e:
        raise MediaError(Reason.TOO_LARGE, str(e)) from None
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError on corrupt data
        raise MediaError(Reason.DECODE_FAILED, f"{image.format or 'image'} decode failed: {e}") from None
    if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
