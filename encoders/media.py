"""Media fetching and image decoding, with the failures named.

Bytes come through Beam's FileSystems (local paths, gs://, s3://, every
registered scheme) or, when enabled, http(s) with a timeout and a byte cap.
Every failure is a :class:`MediaError` carrying a dead-letter reason code, so
the caller can turn it into a row instead of a crash.
"""
from __future__ import annotations

import dataclasses
import functools
import http.client
import io
import ipaddress
import os
import posixpath
import re
import socket
import ssl
import stat
import time
import urllib.parse
from typing import Callable

from PIL import Image, UnidentifiedImageError

from encoders.digest import sha256_hex
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

    def __reduce__(self):
        # pickled whole (a decoding process sends it back): reason, detail and any attribute set later (stage)
        return type(self), (self.reason, self.detail), dict(self.__dict__)


DEFAULT_SCHEMES = ("file", "gs", "s3")
HTTP_SCHEMES = ("http", "https")
MAX_REDIRECTS = 5
# Cloud metadata endpoints that are not link-local (169.254.169.254 and fd00:ec2::254
# are refused by the address rules already); refused even with allow_private_hosts.
METADATA_ADDRESSES = frozenset({"169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2"})


@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    """What media may be read, from where, and how much of it.

    * ``allowed_schemes``: URI schemes read through Beam's FileSystems; ``file``
      stands for local paths. http(s) additionally needs ``allow_http``.
    * ``allowed_roots``: every non-http URI must lie under one of these after
      normalization (local paths: after ``realpath``, so neither ``..`` nor a
      symlink leads out). Empty means no confinement; the pipeline's default is
      the catalog's own folder tree.
    * ``allowed_hosts``: http(s) host names allowed (a leading ``.`` allows
      subdomains); empty allows any host with a public address.
    * ``allow_private_hosts``: allow loopback, private, link-local and other
      non-global addresses (tests, intranet media servers). Metadata endpoints
      stay refused.
    """

    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0
    allow_http: bool = False
    max_image_pixels: int = 50_000_000  # decompression-bomb guard, checked before decoding
    allowed_schemes: tuple[str, ...] = DEFAULT_SCHEMES
    allowed_roots: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    allow_private_hosts: bool = False

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.timeout_s <= 0 or self.max_image_pixels <= 0:
            raise ValueError(f"fetch limits must be positive: {self}")
        for scheme in self.allowed_schemes:
            if not scheme.isalnum() or scheme != scheme.lower():
                raise ValueError(f"allowed scheme {scheme!r} must be a lower-case scheme name such as {DEFAULT_SCHEMES}")
            if scheme in HTTP_SCHEMES:
                raise ValueError(f"http(s) is enabled with allow_http (--allow_http), not as allowed scheme {scheme!r}")
        for root in self.allowed_roots:
            if not root or ".." in root.replace("\\", "/").split("/"):
                raise ValueError(f"allowed root {root!r} must be a non-empty path or URI prefix without '..'")
        for host in self.allowed_hosts:
            bare = host.lstrip(".").strip("[]")
            if not bare or any(c in bare for c in "/@ \t") or (":" in bare and not _is_ip(bare)):
                raise ValueError(f"allowed host {host!r} must be a host name (or .domain for its subdomains)")

    def with_default_root(self, root: str) -> "FetchPolicy":
        """This policy, confined to ``root`` unless roots were given explicitly."""
        if self.allowed_roots or not root:
            return self
        return dataclasses.replace(self, allowed_roots=(root,))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


# RFC 3986: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ), then ":". One letter is not taken
# as a scheme (a drive letter); a relative path whose first segment holds ':' must start with './'.
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


def uri_scheme(uri: str) -> str:
    """The lower-case scheme of ``uri`` (``gs``, ``https``, ``javascript``, ``data``...), '' for a plain path.

    Any ``name:`` prefix counts, with or without ``//``: ``javascript:alert(1)``,
    ``data:...`` and ``mailto:...`` are URIs of those schemes, never relative
    paths, so the policy refuses them instead of resolving them under the catalog.
    """
    match = _SCHEME_RE.match(uri)
    return match.group(1).lower() if match else ""


_scheme = uri_scheme


def resolve_uri(uri: str, base_uri: str = "") -> str:
    """A catalog URI made absolute: relative paths resolve against the catalog file's folder.

    A URI with a scheme (known or not) is returned as it is, so an unknown
    scheme reaches the policy check and is refused there.
    """
    if _scheme(uri) or uri.startswith("/") or not base_uri:
        return uri
    if _scheme(base_uri):
        return base_uri.rstrip("/") + "/" + uri
    return posixpath.normpath(posixpath.join(base_uri, uri))


def _read_capped(stream, max_bytes: int, uri: str, deadline: float | None = None, timeout_s: float = 0.0) -> bytes:
    """At most ``max_bytes`` from ``stream``; refuses more, and gives up at ``deadline``."""
    # read1 returns what has arrived instead of blocking for a full chunk, so the deadline is checked
    return _read_chunks(getattr(stream, "read1", stream.read), max_bytes, uri, deadline=deadline, timeout_s=timeout_s)


def _read_chunks(read: Callable[[int], bytes], max_bytes: int, uri: str, expected: int | None = None,
                 deadline: float | None = None, timeout_s: float = 0.0) -> bytes:
    """``read(n)`` until it returns nothing: at most ``max_bytes`` (more is refused), given up at ``deadline``.

    With the ``expected`` size (a local file's ``stat``), the first read asks for one byte past it, and
    getting fewer at exactly that size is the end: one read instead of two (each read releases the GIL, and
    on a decode thread racing the model's thread every release can cost a hand-off: docs/BENCHMARKS.md,
    issue 11 round 8). A file that grew or shrank since is read on to its end, as without it.
    """
    chunks, total = [], 0
    while True:
        want = expected - total + 1 if expected is not None and total <= expected else 1 << 20
        chunk = read(min(want, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise MediaError(Reason.TOO_LARGE, f"{uri} is larger than the {max_bytes}-byte cap")
        if deadline is not None and time.monotonic() > deadline:
            # a server trickling bytes resets every socket timeout; the whole fetch has one budget
            raise MediaError(Reason.FETCH_TIMEOUT, f"{uri}: not read in {timeout_s}s")
        if total == expected and len(chunk) < want:
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _local_path(uri: str) -> str:
    if uri.lower().startswith("file://"):
        return uri[len("file://"):]
    return uri[len("file:"):] if uri.lower().startswith("file:") else uri


def _c_realpath() -> Callable[[bytes], bytes | None] | None:
    """The C library's realpath(3) as ``f(path) -> resolved path or None``; None where there is none."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)  # the process's own symbols: libc on Linux and macOS, nothing to find
        resolve, free = libc.realpath, libc.free
    except (OSError, AttributeError, ImportError):  # Windows, or a libc without realpath
        return None
    resolve.restype, resolve.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
    free.restype, free.argtypes = None, [ctypes.c_void_p]

    def call(path: bytes) -> bytes | None:
        out = resolve(path, None)  # ctypes releases the GIL once for the whole walk
        if not out:
            return None
        try:
            return ctypes.string_at(out)
        finally:
            free(out)

    return call


_C_REALPATH = _c_realpath()


def real_path(path: str) -> str:
    """``os.path.realpath(path)``, resolved by one C call when the path exists.

    Python's realpath makes one ``lstat`` per path component, and each call
    releases and retakes the GIL: on a fetch thread racing the thread that
    runs the model, those hand-offs cost more CPU than the lstats themselves
    (docs/BENCHMARKS.md, issue 11). realpath(3) walks the same components in
    one call. Wherever it fails (a missing file, a symlink loop, a NUL byte),
    ``os.path.realpath`` answers, so the result is the same in every case.
    """
    if _C_REALPATH is not None and "\0" not in path:
        try:
            resolved = _C_REALPATH(os.fsencode(path))
        except (UnicodeError, ValueError):
            resolved = None
        if resolved is not None:
            return os.fsdecode(resolved)
    return os.path.realpath(path)


def _confine_local(uri: str, policy: FetchPolicy) -> str:
    """The real path of a local URI, if it lies under an allowed local root."""
    path = real_path(_local_path(uri))  # resolves '..' and every symlink
    roots = [r for r in policy.allowed_roots if not _scheme(r) or _scheme(r) == "file"]
    if not policy.allowed_roots:
        return path
    for root in roots:
        real_root = real_path(_local_path(root))
        if path == real_root or path.startswith(real_root.rstrip(os.sep) + os.sep):
            return path
    raise MediaError(Reason.FORBIDDEN_URI, f"{uri} resolves to {path}, outside the allowed media roots "
                                           f"{list(roots) or '(none local)'}")


def _confine_remote(uri: str, scheme: str, policy: FetchPolicy) -> None:
    _, _, rest = uri.partition("://")
    if ".." in rest.split("/") or "\\" in rest:
        raise MediaError(Reason.FORBIDDEN_URI, f"{uri}: '..' segments are not allowed in object URIs")
    if not policy.allowed_roots:
        return
    for root in policy.allowed_roots:
        if _scheme(root) != scheme:
            continue
        prefix = root if root.endswith("/") or root.endswith("://") else root + "/"
        if uri.startswith(prefix) or uri == root:
            return
    raise MediaError(Reason.FORBIDDEN_URI, f"{uri} is outside the allowed media roots {list(policy.allowed_roots)}")


def _fetch_local(uri: str, policy: FetchPolicy) -> bytes:
    path = _confine_local(uri, policy)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MediaError(Reason.MISSING_MEDIA, f"{uri} does not exist") from None
    except OSError as e:
        raise MediaError(Reason.FETCH_FAILED, f"{uri}: {e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise MediaError(Reason.MISSING_MEDIA, f"{uri} is a directory")
    if not stat.S_ISREG(st.st_mode):
        # a FIFO would block the worker forever, a device could stream without end
        raise MediaError(Reason.FORBIDDEN_URI, f"{uri} is not a regular file")
    if st.st_size > policy.max_bytes:
        raise MediaError(Reason.TOO_LARGE, f"{uri} has {st.st_size} bytes, cap {policy.max_bytes}")
    try:
        # O_NOFOLLOW: the path was resolved above; a symlink swapped in since then is refused
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            return _read_chunks(functools.partial(os.read, fd), policy.max_bytes, uri, expected=st.st_size)
        finally:
            os.close(fd)
    except MediaError:
        raise
    except OSError as e:
        raise MediaError(Reason.FETCH_FAILED, f"{uri}: {e}") from None


def check_address(ip: str, policy: FetchPolicy, uri: str) -> None:
    """Refuses addresses a fetch must not reach: metadata endpoints always, non-global ones by default."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if str(addr) in METADATA_ADDRESSES:
        raise MediaError(Reason.FORBIDDEN_URI, f"{uri}: {addr} is a cloud metadata endpoint")
    if policy.allow_private_hosts:
        if addr.is_multicast or addr.is_unspecified:
            raise MediaError(Reason.FORBIDDEN_URI, f"{uri}: {addr} is not a unicast address")
        return
    if not addr.is_global or addr.is_multicast:
        kind = ("loopback" if addr.is_loopback else "link-local" if addr.is_link_local
                else "private" if addr.is_private else "non-global")
        raise MediaError(Reason.FORBIDDEN_URI, f"{uri}: {addr} is a {kind} address (--allow_private_hosts)")


def _host_allowed(host: str, policy: FetchPolicy) -> bool:
    if not policy.allowed_hosts:
        return True
    host = host.lower().rstrip(".")
    for allowed in policy.allowed_hosts:
        allowed = allowed.lower().rstrip(".")
        if allowed.startswith("."):
            if host.endswith(allowed) or host == allowed[1:]:
                return True
        elif host == allowed.strip("[]"):
            return True
    return False


def _checked_address(uri: str, policy: FetchPolicy) -> tuple[str, str, int, str]:
    """(scheme, host, port, IP to connect to) for an http(s) URI that passes the policy."""
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in HTTP_SCHEMES:
        raise MediaError(Reason.FORBIDDEN_URI, f"{uri}: scheme {scheme!r} is not http(s)")
    if parts.username or parts.password:
        raise MediaError(Reason.FORBIDDEN_URI, f"{uri}: credentials in media URIs are not allowed")
    host = parts.hostname
    if not host:
        raise MediaError(Reason.FORBIDDEN_URI, f"{uri}: no host")
    if not _host_allowed(host, policy):
        raise MediaError(Reason.FORBIDDEN_URI, f"{uri}: host {host!r} is not in the allowed hosts {list(policy.allowed_hosts)}")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise MediaError(Reason.FORBIDDEN_URI, f"{uri}: bad port") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise MediaError(Reason.FETCH_FAILED, f"{uri}: cannot resolve {host!r}: {e}") from None
    ips = sorted({info[4][0] for info in infos})
    if not ips:
        raise MediaError(Reason.FETCH_FAILED, f"{uri}: {host!r} has no address")
    for ip in ips:  # every address: a name resolving to one public and one private address is refused
        check_address(ip, policy, uri)
    return scheme, host, port, ips[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the address that was checked, not to whatever DNS answers next (rebinding)."""

    def __init__(self, host, port, ip, timeout):
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self):
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host, port, ip, timeout):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self):
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        # certificate checked against the host name, SNI sent for it
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _fetch_http(uri: str, policy: FetchPolicy) -> bytes:
    """GET with every hop checked: scheme, host list, each resolved address; redirects re-checked."""
    deadline = time.monotonic() + policy.timeout_s
    current = uri
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host, port, ip = _checked_address(current, policy)
        parts = urllib.parse.urlsplit(current)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        conn = cls(host, port, ip, policy.timeout_s)
        try:
            conn.request("GET", target, headers={"User-Agent": "catalog-index/1", "Accept-Encoding": "identity"})
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise MediaError(Reason.FETCH_FAILED, f"{current}: redirect without Location")
                current = urllib.parse.urljoin(current, location)
                continue
            if response.status in (404, 410):
                raise MediaError(Reason.MISSING_MEDIA, f"{current}: HTTP {response.status}")
            if response.status != 200:
                raise MediaError(Reason.FETCH_FAILED, f"{current}: HTTP {response.status}")
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise MediaError(Reason.TOO_LARGE, f"{current} declares {length} bytes, cap {policy.max_bytes}")
            return _read_capped(response, policy.max_bytes, current, deadline, policy.timeout_s)
        except MediaError:
            raise
        except (socket.timeout, TimeoutError):
            raise MediaError(Reason.FETCH_TIMEOUT, f"{current}: no answer in {policy.timeout_s}s") from None
        except (OSError, http.client.HTTPException) as e:
            raise MediaError(Reason.FETCH_FAILED, f"{current}: {type(e).__name__}: {e}") from None
        finally:
            conn.close()
    raise MediaError(Reason.FETCH_FAILED, f"{uri}: more than {MAX_REDIRECTS} redirects")


def check_scheme(uri: str, policy: FetchPolicy) -> str:
    """The scheme of a non-http ``uri`` if the policy allows it; refuses unknown and unlisted ones."""
    scheme = uri_scheme(uri)
    if (scheme or "file") in policy.allowed_schemes:
        return scheme
    raise MediaError(Reason.FORBIDDEN_URI, f"{_shown(uri)}: scheme {scheme or 'file'!r} is not in the allowed "
                                           f"schemes {list(policy.allowed_schemes)} (--allowed_media_schemes)")


def _shown(uri: str, limit: int = 120) -> str:
    # data: URIs can carry megabytes; a dead letter's detail stays readable
    return uri if len(uri) <= limit else uri[:limit - 3] + "..."


def fetch_bytes(uri: str, policy: FetchPolicy = FetchPolicy()) -> bytes:
    """Reads one media object, at most ``policy.max_bytes`` of it, if the policy allows the URI."""
    scheme = _scheme(uri)
    if scheme in HTTP_SCHEMES:
        if not policy.allow_http:
            raise MediaError(Reason.FORBIDDEN_URI, f"{uri}: http(s) media is disabled (--allow_http)")
        return _fetch_http(uri, policy)
    check_scheme(uri, policy)
    if scheme in ("", "file"):
        return _fetch_local(uri, policy)
    _confine_remote(uri, scheme, policy)
    from apache_beam.io.filesystems import FileSystems  # here: a decoding process of local files never imports Beam

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


def decode_image(data: bytes, max_pixels: int = FetchPolicy.max_image_pixels,
                 draft_size: Callable[[int, int], tuple[int, int]] | None = None) -> Image.Image:
    """Bytes to an RGB image; refuses bombs by header size before decoding pixels.

    ``draft_size(width, height)`` -> the size the caller needs at least: a JPEG
    much larger than that is decoded at 1/2, 1/4 or 1/8 scale in the IDCT
    (PIL ``draft``), which skips most of the decode work; the result is never
    smaller than asked. Other formats decode at full size.
    """
    image = probe_image(data, max_pixels)
    try:
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", draft_size(*image.size))
        image.load()
    except Image.DecompressionBombError as e:
        raise MediaError(Reason.TOO_LARGE, str(e)) from None
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError on corrupt data
        raise MediaError(Reason.DECODE_FAILED, f"{image.format or 'image'} decode failed: {e}") from None
    if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # convert("RGB") of an RGB image is a full copy (one more C call that releases the GIL): skipped
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_for_tower(data: bytes, preprocess, max_pixels: int = FetchPolicy.max_image_pixels):
    """Encoded image -> uint8 [S, S, 3] for an image tower (``preprocess``: an ImagePreprocess).

    The one CPU decode path for towers (items, queries, fit-fusion, the GPU
    path's fallback): a JPEG much larger than the tower's input decodes at
    reduced scale, then PIL resizes and crops. A hook on decoded media
    (thumbnails) belongs here.
    """
    return preprocess.resize_crop(decode_image(data, max_pixels, draft_size=preprocess.draft_size))


def load_image(uri: str, policy: FetchPolicy, preprocess) -> tuple:
    """One image URI -> (normalized float32 [3, S, S] pixels, sha256 of its bytes); raises MediaError.

    One image at a time, for the query side and fit-fusion; the embed stage
    fetches and decodes a batch on threads (``pipeline/stages/fetch.py``).
    """
    data = fetch_bytes(uri, policy)
    pixels = decode_for_tower(data, preprocess, policy.max_image_pixels)
    return preprocess.normalize(pixels[None])[0], sha256_hex(data)
